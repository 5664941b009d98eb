"""Low-bit codes under secure aggregation: masked in a ring just large enough for their sum.

Masks make an upload uniform noise, so no codec can shrink it after masking; the only way to
send fewer bytes is to mask fewer bits. Each client turns its weighted update into integer codes
in [−L, L] (L = 2^(bits−1) − 1; 2 bits are the ternary −1, 0, 1) by stochastic rounding at one
scale the aggregator announced before the round, so that codes from every client add up. The
sum of n clients' codes lies in [−nL, nL], so it is exact modulo 2^m with m = ⌈log₂(2nL + 1)⌉
(3 bits for ternary codes and 3 clients): each client sends m bits per entry, packed, where the
fixed-point path sends 32. Masks are drawn modulo 2^32 as before and reduced: 2^m divides 2^32,
so summing and unmasking commute with the reduction, and the unmasked sum is exactly the sum
of the codes.

The scale is a bound the aggregator knows without seeing an update: AdamW moves an entry by
about the learning rate per step, so a client's change is at most lr × its steps, and its
weighted share at most that times its weight over the total; the largest share sets the scale
(the few entries past it are clipped, and error feedback carries what was clipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedlib.rejection import Reason, UpdateRejected
from fedlib.secagg.fixedpoint import MODULUS, Tensors


def levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class Codes:
    """How a quantised secure round codes its updates: `bits` per code before masking, `parties`
    in the session (the ring must hold their sum), `scale` the value of code 1."""

    bits: int
    parties: int
    scale: float

    @property
    def ring(self) -> int:
        """Bits per masked entry: enough for the sum of every party's codes, signed."""
        return math.ceil(math.log2(2 * self.parties * levels(self.bits) + 1))

    def quantise(self, tensors: Tensors, generator: torch.Generator) -> Tensors:
        """Integer codes in [−L, L], unbiased inside the range: E[code · scale] = value."""
        bound = levels(self.bits)
        out = {}
        for name, value in tensors.items():
            if not torch.isfinite(value).all():
                raise UpdateRejected(Reason.NON_FINITE, f"{name}: NaN or Inf cannot be coded")
            position = (value.to(torch.float64) / self.scale).clamp(-bound, bound)
            low = position.floor()
            up = torch.rand(position.shape, generator=generator, dtype=torch.float64) < (position - low)
            out[name] = (low + up).clamp(-bound, bound).to(torch.int64)
        return out

    def wire_template(self, template: Tensors) -> Tensors:
        """What a masked update must look like: `ring` bits per entry of each tensor, packed."""
        return {name: torch.empty(math.ceil(value.numel() * self.ring / 8), dtype=torch.uint8) for name, value in template.items()}

    def pack(self, residues: Tensors) -> Tensors:
        """Residues mod 2^32 → their low `ring` bits, packed little-endian into bytes."""
        shifts = np.arange(self.ring, dtype=np.int64)
        out = {}
        for name, value in residues.items():
            low = value.flatten().numpy() & ((1 << self.ring) - 1)
            bits = ((low[:, None] >> shifts) & 1).astype(np.uint8)
            out[name] = torch.from_numpy(np.packbits(bits.ravel(), bitorder="little"))
        return out

    def unpack(self, packed: Tensors, template: Tensors) -> Tensors:
        """Packed masked codes → residues in [0, 2^ring), as int64 shaped like `template` (the
        caller has checked each packed size against `wire_template`)."""
        shifts = np.arange(self.ring, dtype=np.int64)
        out = {}
        for name, value in packed.items():
            count = template[name].numel()
            bits = np.unpackbits(value.numpy(), bitorder="little", count=count * self.ring).reshape(count, self.ring)
            out[name] = torch.from_numpy((bits.astype(np.int64) << shifts).sum(axis=1)).reshape(template[name].shape)
        return out

    def decode_sum(self, total: Tensors) -> Tensors:
        """The unmasked sum (residues mod 2^32) as the signed sum of codes, times the scale."""
        modulus = 1 << self.ring
        out = {}
        for name, value in total.items():
            low = torch.remainder(value, MODULUS) & (modulus - 1)
            out[name] = torch.where(low >= modulus // 2, low - modulus, low).to(torch.float64) * self.scale
        return out


def code_scale(learning_rate: float, steps: int, largest_share: float, bits: int) -> float:
    """The value of code 1 for a round: the largest weighted change a client can make (lr ×
    steps × its weight share) spread over the L positive codes."""
    return learning_rate * steps * largest_share / levels(bits)
