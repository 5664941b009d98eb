"""Real tensors as integers modulo 2^32, so that masks are uniform and sums wrap exactly."""

from __future__ import annotations

import torch

MODULUS = 1 << 32
_HALF = 1 << 31

Tensors = dict[str, torch.Tensor]


def encode(tensors: Tensors, frac_bits: int) -> Tensors:
    """round(x·2^frac_bits) mod 2^32, as int64. Values whose sum could wrap are refused: the
    caller bounds them (clipping, or pre-weighting with known totals)."""
    out = {}
    for name, value in tensors.items():
        scaled = torch.round(value.to(torch.float64) * (1 << frac_bits))
        if scaled.abs().max() >= _HALF:
            raise OverflowError(f"{name}: |value| ≥ 2^{31 - frac_bits} does not fit {frac_bits} fractional bits")
        out[name] = torch.remainder(scaled.to(torch.int64), MODULUS)
    return out


def decode(tensors: Tensors, frac_bits: int) -> Tensors:
    """The signed value of each residue (two's complement on 32 bits), as float64."""
    return {
        name: torch.where(value >= _HALF, value - MODULUS, value).to(torch.float64) / (1 << frac_bits)
        for name, value in tensors.items()
    }

