"""The configured codecs, in order: tensor codecs from the registry, then `zstd` over the
serialised bytes.

The description of each step travels in the authenticated payload, and the aggregator refuses
any chain other than the configured one. Decoding trusts nothing else in the payload: the
description is parsed by the decode boundary into typed steps, every declared shape is checked
against the expected template *before* anything of that shape is allocated (a 420-byte update
once declared 2^27 entries), and every index and length is checked, so a bad one is a named
rejection rather than an exception or an allocation deeper in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import zstandard

from fedlib.codecs.base import CodecOptions, SizeBound, TensorCodec, Tensors, bad, codecs
from fedlib.rejection import Reason, UpdateRejected
from fedlib.wire.decode import expect, parse_json

ZSTD = "zstd"


def tensor_codec(name: str, options: CodecOptions = CodecOptions()) -> TensorCodec:
    try:
        return codecs.get(name)(options)
    except KeyError as err:
        raise ValueError(f"{err.args[0]} (or {ZSTD!r}, last)") from None


def parse_description(description: str) -> list[tuple[str, dict[str, Any]]]:
    """The codec description as typed steps: `[name, {field: {name: shape}}]`, the one field the
    named codec declares (`cast` or `shapes`). Anything else is a named rejection."""
    steps = expect(parse_json(description, "codec description", 1 << 20, max_depth=5), list, "codec description")
    out = []
    for step in steps:
        # the name's type first: `{} in codecs.items` would raise TypeError (unhashable), not reject
        if not (
            isinstance(step, list) and len(step) == 2 and isinstance(step[0], str) and step[0] in codecs.items and isinstance(step[1], dict)
        ):
            raise bad("each step must be [codec name, description]")
        name, meta = step
        field = tensor_codec(name).meta_field
        if set(meta) != {field}:
            raise bad(f"{name}: expected exactly the field {field!r}")
        expect(meta[field], dict, f"codec: {name} {field}")
        out.append((name, meta))
    return out


@dataclass(frozen=True)
class CodecChain:
    """The configured codecs, in order; `zstd`, if present, last."""

    names: tuple[str, ...] = ()
    topk_fraction: float = 0.01
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if ZSTD in self.names[:-1]:
            raise ValueError("zstd compresses bytes, so it must be the last codec")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"a codec appears twice in {list(self.names)}")
        steps = self.codecs  # unknown names and bad options raise here
        lasts = [i for i, codec in enumerate(steps) if codec.last]
        if lasts and lasts[0] != len(steps) - 1:
            # a codec after a half cast or a low-bit code would recast or sparsify what it left (its scales)
            last = ", ".join(c.name for c in steps if c.last)
            raise ValueError(f"{last} must be the last tensor codec ({list(self.names)})")
        quantisers = [c.name for c in steps if c.role == "quantiser"]
        if len(quantisers) > 1:
            raise ValueError(f"one quantiser at most, got {quantisers} in {list(self.names)}")

    @cached_property
    def codecs(self) -> tuple[TensorCodec, ...]:
        options = CodecOptions(topk_fraction=self.topk_fraction)
        return tuple(tensor_codec(name, options) for name in self.tensor_codecs)

    @property
    def tensor_codecs(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n != ZSTD)

    @property
    def lossy(self) -> bool:
        return bool(self.tensor_codecs)

    def encode(self, tensors: Tensors, generator: torch.Generator | None = None) -> tuple[Tensors, str]:
        """The encoded tensors and the JSON that describes each step, for the payload metadata.
        `generator` draws stochastic rounding (a client seeds it per round)."""
        rounding = generator or torch.Generator().manual_seed(0)
        steps: list[list[Any]] = []
        for codec in self.codecs:
            tensors, meta = codec.encode(tensors, rounding)
            steps.append([codec.name, meta])
        return tensors, json.dumps(steps)

    def decode(self, tensors: Tensors, description: str | None, template: Mapping[str, torch.Tensor]) -> Tensors:
        """Undo `encode`, in reverse; the description must name exactly this chain, and every
        shape it declares must fit `template` (the tensors the update is expected to hold)."""
        steps = parse_description(description or "[]")
        names = [name for name, _ in steps]
        if names != list(self.tensor_codecs):
            raise bad(f"update encoded with {names}, this federation uses {list(self.tensor_codecs)}")
        bound = SizeBound.of(template)
        tensors = dict(tensors)
        try:
            for codec, (_, meta) in zip(reversed(self.codecs), reversed(steps), strict=False):
                tensors = codec.decode(tensors, meta, bound)
        except (
            RuntimeError,
            IndexError,
            ValueError,
            TypeError,
            KeyError,
            OverflowError,
            MemoryError,
        ) as err:  # a tensor op on parts that passed every check
            if isinstance(err, UpdateRejected):
                raise
            raise bad(f"does not decode: {type(err).__name__}: {str(err)[:120]}") from None
        return tensors

    def compress(self, payload: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.zstd_level).compress(payload) if ZSTD in self.names else payload

    def decompress(self, payload: bytes, max_bytes: int) -> bytes:
        """Refuses to inflate past `max_bytes`, so a tiny object cannot become a huge one: the
        frame is read in chunks and never past the limit, whatever size it declares."""
        if ZSTD not in self.names:
            return payload
        chunks, total = [], 0
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(payload)
            while total <= max_bytes:
                chunk = reader.read(min(1 << 20, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except (zstandard.ZstdError, MemoryError, ValueError) as err:
            raise bad(f"zstd: {err}") from None
        if total > max_bytes:
            raise UpdateRejected(Reason.TOO_LARGE, f"decompresses past {max_bytes} bytes")
        return b"".join(chunks)
