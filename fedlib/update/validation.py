"""What a decrypted update must look like before it may touch the global adapter."""

from __future__ import annotations

import torch

from fedlib.rejection import Reason, UpdateRejected

Tensors = dict[str, torch.Tensor]


def check_update(update: Tensors, template: Tensors) -> None:
    """Same names, shapes and dtypes as the global adapter, and every value finite."""
    missing, extra = template.keys() - update.keys(), update.keys() - template.keys()
    if missing or extra:
        raise UpdateRejected(Reason.UNEXPECTED_TENSORS, f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for name, ref in template.items():
        got = update[name]
        if got.shape != ref.shape:
            raise UpdateRejected(Reason.SHAPE_MISMATCH, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise UpdateRejected(Reason.DTYPE_MISMATCH, f"{name}: dtype {got.dtype}, expected {ref.dtype}")
        if not torch.isfinite(got).all():
            raise UpdateRejected(Reason.NON_FINITE, f"{name}: contains NaN or Inf")
