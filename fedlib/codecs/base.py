"""What every tensor codec is, and the checks they share.

A tensor codec turns named tensors into other named tensors (`w` into `w::q`, `w::scale`, ...)
and says how to undo it in a small JSON step (`meta`). Codecs are found by name in `codecs`, as
strategies are, and one contract suite (`tests/test_codec_contract.py`) holds every registered
codec to the same four promises: the round trip keeps names, shapes and dtypes and stays within
the codec's `error_bound`; the encoded parts cost at most `cost` bytes; any part or step that does
not fit is a named `UpdateRejected`; nothing is allocated at a declared shape before the shape is
checked against the expected template (`SizeBound`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from fedlib.registry import Registry
from fedlib.rejection import Reason, UpdateRejected
from fedlib.wire.decode import TensorSpec, shape_of

Tensors = dict[str, torch.Tensor]
ROW = 256  # a 1-D tensor's row length in `row_layout`
Role = Literal["cast", "quantiser", "sparsifier"]


@dataclass(frozen=True)
class CodecOptions:
    """The `compression` settings a codec may read."""

    topk_fraction: float = 0.01


class TensorCodec(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def role(self) -> Role:
        """At most one quantiser per chain."""
        ...

    @property
    def last(self) -> bool:
        """Must be the chain's last tensor codec (a later one would recast its scales)."""
        ...

    @property
    def meta_field(self) -> str:
        """The one field of its description step: "cast" or "shapes"."""
        ...

    def encode(self, tensors: Tensors, rounding: torch.Generator) -> tuple[Tensors, dict]: ...

    def decode(self, tensors: Tensors, meta: dict, bound: SizeBound) -> Tensors: ...

    def error_bound(self, value: torch.Tensor) -> torch.Tensor:
        """The largest decoded error each entry of `value` may get (a float tensor of its shape)."""
        ...

    def cost(self, shape: tuple[int, ...]) -> int:
        """The most bytes the encoded parts of a tensor of `shape` take."""
        ...


codecs: Registry[Callable[[CodecOptions], TensorCodec]] = Registry("codec")


def bad(detail: str) -> UpdateRejected:
    return UpdateRejected(Reason.MALFORMED, f"codec: {detail}")


def take(tensors: Tensors, name: str) -> torch.Tensor:
    try:
        return tensors.pop(name)
    except KeyError:
        raise bad(f"missing tensor {name!r}") from None


@dataclass(frozen=True)
class SizeBound:
    """How large an encoded or decoded tensor may be, from the template of the update it belongs
    to: `w::values`, `w::gaps`, `w::q` ... are parts of template tensor `w`, and no part may hold
    more than about twice `w`'s entries (gap tokens and int8 row padding add a little)."""

    numel: Mapping[str, int]

    @classmethod
    def of(cls, template: Mapping[str, torch.Tensor]) -> SizeBound:
        return cls({name: value.numel() for name, value in template.items()})

    def limit(self, name: str) -> int | None:
        root = name.split("::", 1)[0]
        return None if root not in self.numel else 2 * self.numel[root] + 256

    def check(self, name: str, numel: int) -> None:
        limit = self.limit(name)
        if limit is None:
            raise UpdateRejected(Reason.UNEXPECTED_TENSORS, f"codec: {name!r} is not part of any expected tensor")
        if numel > limit:
            raise UpdateRejected(Reason.SHAPE_MISMATCH, f"codec: {name!r} declares {numel} entries, at most {limit} expected")

    def why_not(self, name: str, spec: TensorSpec) -> str | None:
        """For `fedlib.wire.decode.load_tensors`: why a payload tensor may not be built, if it may not."""
        limit = self.limit(name)
        if limit is None:
            return "not part of any expected tensor"
        return None if spec.numel <= limit else f"{spec.numel} entries, at most {limit} expected"


def declared_shape(value: Any, name: str, bound: SizeBound) -> list[int]:
    """A shape from a description step, checked against the template before anything is built."""
    shape = list(shape_of(value, f"codec: {name}"))
    bound.check(name, math.prod(shape))
    return shape


def row_layout(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """Rows × columns of the int8 matrix for a tensor of `shape`: a 2-D tensor's rows, or its
    columns when they are the longer side (LoRA's B is out × r: r-long rows would spend a scale
    per r values)."""
    if len(shape) == 2:
        return (shape[0], shape[1]) if shape[1] >= shape[0] else (shape[1], shape[0])
    return math.ceil(math.prod(shape) / ROW), ROW


def as_rows(value: torch.Tensor) -> torch.Tensor:
    """`value` laid out as `row_layout` says (1-D tensors zero-padded to whole rows)."""
    if value.dim() == 2:
        return value if value.shape[1] >= value.shape[0] else value.T
    flat = value.flatten()
    return torch.cat([flat, flat.new_zeros((-flat.numel()) % ROW)]).reshape(-1, ROW)


def from_rows(rows: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if len(shape) == 2 and shape[1] < shape[0]:
        rows = rows.T
    return rows.flatten()[: math.prod(shape)].reshape(shape)


def encode_each(tensors: Tensors, encode_one: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> tuple[Tensors, dict]:
    """A `shapes` step: `encode_one` turns each floating-point tensor `w` into its parts (named
    `w::part` on the wire), integer tensors pass through, and the step records each encoded
    tensor's shape for the decoder to check before it builds anything."""
    out, shapes = {}, {}
    for name, value in tensors.items():
        if not value.is_floating_point():
            out[name] = value
            continue
        out |= {f"{name}::{part}": encoded for part, encoded in encode_one(value).items()}
        shapes[name] = list(value.shape)
    return out, {"shapes": shapes}
