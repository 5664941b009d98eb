"""`int8`: symmetric quantisation with one fp32 scale per row of `row_layout` (about 4× fewer
bytes)."""

from __future__ import annotations

from typing import ClassVar

import torch

from fedlib.codecs.base import Role, SizeBound, Tensors, as_rows, bad, codecs, declared_shape, encode_each, from_rows, row_layout, take


class Int8:
    name = "int8"
    role: ClassVar[Role] = "quantiser"
    last = False
    meta_field = "shapes"

    def encode(self, tensors: Tensors, rounding: torch.Generator) -> tuple[Tensors, dict]:
        def one(value: torch.Tensor) -> dict[str, torch.Tensor]:
            rows = as_rows(value.to(torch.float32))
            scale = rows.abs().amax(dim=1).clamp_min(1e-30) / 127.0
            return {"q": torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8), "scale": scale}

        return encode_each(tensors, one)

    def decode(self, tensors: Tensors, meta: dict, bound: SizeBound) -> Tensors:
        for name, shape in meta["shapes"].items():
            shape = declared_shape(shape, name, bound)
            q, scale = take(tensors, f"{name}::q"), take(tensors, f"{name}::scale")
            rows, cols = row_layout(shape)
            if q.dtype != torch.int8 or q.shape != (rows, cols) or scale.dtype != torch.float32 or scale.shape != (rows,):
                raise bad(f"{name}: int8 rows and scales do not fit shape {shape}")
            tensors[name] = from_rows(q.to(torch.float32) * scale[:, None], shape)
        return tensors

    def error_bound(self, value: torch.Tensor) -> torch.Tensor:
        rows = as_rows(value.to(torch.float32))
        half_step = rows.abs().amax(dim=1, keepdim=True).expand_as(rows) / 254.0
        return from_rows(half_step, list(value.shape)) * 1.0001 + 1e-30

    def cost(self, shape: tuple[int, ...]) -> int:
        rows, cols = row_layout(shape)
        return rows * cols + 4 * rows


codecs.register("int8")(lambda options: Int8())

__all__ = ["Int8"]
