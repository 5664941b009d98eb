"""Real tensors as integers modulo 2^32, so that masks are uniform and sums wrap exactly."""

from __future__ import annotations

import torch

from fedlib.rejection import Reason, UpdateRejected

MODULUS = 1 << 32
_HALF = 1 << 31

Tensors = dict[str, torch.Tensor]


def encode(tensors: Tensors, frac_bits: int, parties: int = 1) -> Tensors:
    """round(x·2^frac_bits) mod 2^32, as int64. A value is refused unless the sum of `parties`
    values that large still fits, because the aggregator cannot see a wrapped sum."""
    limit = _HALF // parties
    out = {}
    for name, value in tensors.items():
        if not torch.isfinite(value).all():  # round(NaN) would quietly become 0 in the sum
            raise UpdateRejected(Reason.NON_FINITE, f"{name}: NaN or Inf cannot be encoded as a fixed-point value")
        scaled = torch.round(value.to(torch.float64) * (1 << frac_bits))
        if scaled.numel() and scaled.abs().max() >= limit:
            bound = limit / (1 << frac_bits)
            raise OverflowError(
                f"{name}: |value| {float(value.abs().max()):.4g} ≥ {bound:.4g}, the most that {parties} parties can "
                f"sum with {frac_bits} fractional bits (lower secure_aggregation.frac_bits)"
            )
        out[name] = torch.remainder(scaled.to(torch.int64), MODULUS)
    return out


def decode(tensors: Tensors, frac_bits: int) -> Tensors:
    """The signed value of each residue (two's complement on 32 bits), as float64."""
    return {
        name: torch.where(value >= _HALF, value - MODULUS, value).to(torch.float64) / (1 << frac_bits) for name, value in tensors.items()
    }


def to_wire(residues: Tensors) -> Tensors:
    """Residues as int32 (the same 32 bits), so a masked update is no bigger than an fp32 one."""
    return {name: torch.where(value >= _HALF, value - MODULUS, value).to(torch.int32) for name, value in residues.items()}


def from_wire(tensors: Tensors) -> Tensors:
    return {name: torch.remainder(value.to(torch.int64), MODULUS) for name, value in tensors.items()}
