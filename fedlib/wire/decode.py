"""The one decode boundary: every byte that arrives from storage or the wire is parsed here.

Three parsers, each of which turns *any* failure (bad UTF-8, recursion, wrong types, numbers
past any sane size, offsets outside the buffer) into `UpdateRejected(MALFORMED, ...)`, and which
check declared sizes before memory is spent on them:

- `parse_json`: bounded length and nesting depth, no NaN/Infinity, checked before `json.loads`
  runs (a 4 KiB header of `[[[[...` used to abort a round with `RecursionError`);
- `safetensors_layout`: the safetensors header (names, dtypes, shapes, offsets) checked against
  the buffer it describes, so the library is only handed payloads whose tensors it can build
  from the bytes that are there;
- `load_tensors`: the tensors of a payload whose layout passed, with an optional `allowed`
  check on each tensor's declared size (against the expected template) before any is built.

Callers authenticate first where they can (the envelope's tag), but a client with a real key can
still be buggy or hostile, so nothing here trusts what it parses.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from fedlib.rejection import Reason, UpdateRejected

MAX_JSON_DEPTH = 16
MAX_SAFETENSORS_HEADER = 1 << 20
MAX_DIMS = 8
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
}


def malformed(what: str, detail: str) -> UpdateRejected:
    return UpdateRejected(Reason.MALFORMED, f"{what}: {detail}")


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings, without recursing (the input may be hostile)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(
    raw: bytes | bytearray | memoryview | str, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, constants: bool = False
) -> Any:
    """`json.loads` that can fail only with a named rejection. NaN and Infinity are refused
    unless `constants` (a signed manifest may record an infinite ε or perplexity)."""
    if len(raw) > max_bytes:
        raise malformed(what, f"{len(raw)} bytes of JSON, limit {max_bytes}")
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        if _depth(text) > max_depth:
            raise ValueError(f"nested deeper than {max_depth}")
        return json.loads(text) if constants else json.loads(text, parse_constant=_no_constants)
    except (ValueError, TypeError, RecursionError, OverflowError, MemoryError) as err:
        raise malformed(what, f"unreadable JSON ({type(err).__name__}: {str(err)[:120]})") from None


def expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` if it is a `kind` (bool is never an int here), else a named rejection."""
    if isinstance(value, bool) and kind in (int, (int,)):
        raise malformed(what, "expected an integer, got a boolean")
    if not isinstance(value, kind):
        raise malformed(what, f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def shape_of(value: Any, what: str) -> tuple[int, ...]:
    """A declared shape: a short list of non-negative ints whose product fits in an int64."""
    expect(value, list, what)
    if len(value) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in value):
        raise malformed(what, f"bad shape {str(value)[:80]}")
    if math.prod(value) >= 1 << 48:
        raise malformed(what, f"shape {value} declares {math.prod(value)} elements")
    return tuple(value)


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]


def safetensors_layout(payload: bytes | bytearray | memoryview, what: str = "payload") -> Layout:
    """Names, dtypes and shapes of a safetensors payload, every offset checked against the buffer
    (contiguous, in order, exactly filling it), before a single tensor is built."""
    if len(payload) < 8:
        raise malformed(what, f"{len(payload)} bytes is shorter than a safetensors header")
    (size,) = struct.unpack_from("<Q", payload, 0)
    if size > min(MAX_SAFETENSORS_HEADER, len(payload) - 8):
        raise malformed(what, f"safetensors header of {size} bytes in a {len(payload)}-byte payload")
    header = expect(parse_json(memoryview(payload)[8 : 8 + size], f"{what} header", MAX_SAFETENSORS_HEADER, 3), dict, what)
    metadata = header.pop("__metadata__", {})
    expect(metadata, dict, f"{what} metadata")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise malformed(what, "metadata values must be strings")
    data_bytes = len(payload) - 8 - size
    specs: dict[str, TensorSpec] = {}
    ranges = []
    for name, entry in header.items():
        entry = expect(entry, dict, f"{what} tensor {name!r}")
        if set(entry) != {"dtype", "shape", "data_offsets"}:
            raise malformed(what, f"tensor {name!r}: fields {sorted(entry)[:5]}")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise malformed(what, f"tensor {name!r}: dtype {str(entry['dtype'])[:20]!r} is not accepted")
        shape = shape_of(entry["shape"], f"{what} tensor {name!r}")
        offsets = expect(entry["data_offsets"], list, f"{what} tensor {name!r} offsets")
        if len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise malformed(what, f"tensor {name!r}: bad data_offsets")
        start, end = offsets
        nbytes = math.prod(shape) * dtype[1]
        if not 0 <= start <= end <= data_bytes or end - start != nbytes:
            raise malformed(what, f"tensor {name!r}: offsets {offsets} do not hold {shape} {entry['dtype']}")
        specs[name] = TensorSpec(dtype[0], shape, nbytes)
        ranges.append((start, end))
    position = 0
    for start, end in sorted(ranges):
        if start != position:
            raise malformed(what, "tensor data overlaps or leaves gaps")
        position = end
    if position != data_bytes:
        raise malformed(what, f"{data_bytes - position} bytes after the last tensor")
    return Layout(specs, dict(metadata))


def load_tensors(
    payload: bytes | bytearray | memoryview,
    what: str = "payload",
    allowed: Callable[[str, TensorSpec], str | None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a payload; `allowed(name, spec)` returns why a tensor may not
    be built (its name or size is not one the caller expects), checked for all before any is."""
    layout = safetensors_layout(payload, what)
    if allowed is not None:
        for name, spec in layout.tensors.items():
            why = allowed(name, spec)
            if why is not None:
                raise UpdateRejected(Reason.UNEXPECTED_TENSORS, f"{what}: {name!r}: {why}")
    try:
        return load(bytes(payload)), layout.metadata
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise malformed(what, f"not a safetensors payload: {err}") from None


def bounded_int(metadata: Mapping[str, str], key: str, low: int, high: int, what: str = "payload") -> int:
    """An integer field of a payload's metadata, within [low, high]: a self-reported count is
    never trusted past what the round asked for."""
    raw = metadata.get(key)
    if raw is None or not (0 < len(raw) <= 20) or not raw.lstrip("-").isdigit():
        raise malformed(what, f"{key} missing or not an integer")
    value = int(raw)
    if not low <= value <= high:
        raise UpdateRejected(Reason.OUT_OF_RANGE, f"{what}: {key}={value} outside [{low}, {high}]")
    return value
