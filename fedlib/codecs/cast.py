"""`fp16`, `bf16`: half-precision floats, 2× fewer bytes. The step names each tensor it cast
with its shape, so a part cut short or widened in transit is refused here, whether it is a
template tensor or a part another codec left (int8's rows and scales)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlib.codecs.base import Role, SizeBound, Tensors, bad, codecs, declared_shape


@dataclass(frozen=True)
class HalfCast:
    name: str
    dtype: torch.dtype
    mantissa_bits: int
    role: ClassVar[Role] = "cast"
    last = True
    meta_field = "cast"

    def encode(self, tensors: Tensors, rounding: torch.Generator) -> tuple[Tensors, dict]:
        cast = {name: list(value.shape) for name, value in tensors.items() if value.is_floating_point()}
        return {n: v.to(self.dtype) if n in cast else v for n, v in tensors.items()}, {"cast": cast}

    def decode(self, tensors: Tensors, meta: dict, bound: SizeBound) -> Tensors:
        for name, shape in meta["cast"].items():
            shape = declared_shape(shape, name, bound)
            if name not in tensors or tensors[name].dtype != self.dtype or list(tensors[name].shape) != shape:
                raise bad(f"{name}: expected a {self.dtype} tensor of shape {shape}")
            tensors[name] = tensors[name].to(torch.float32)
        return tensors

    def error_bound(self, value: torch.Tensor) -> torch.Tensor:
        return value.abs() * 2.0**-self.mantissa_bits + 1e-7  # round to nearest, and fp16's subnormals

    def cost(self, shape: tuple[int, ...]) -> int:
        return 2 * math.prod(shape)


codecs.register("fp16")(lambda options: HalfCast("fp16", torch.float16, 10))
codecs.register("bf16")(lambda options: HalfCast("bf16", torch.bfloat16, 7))

__all__ = ["HalfCast"]
