"""A client's masked update: what it uploads instead of its delta when secure aggregation is on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlib.config import PrivacyConfig
from fedlib.privacy.dp import add_noise_share_inplace, noise_generator, release_noise_generator
from fedlib.secagg.fixedpoint import MODULUS, Tensors, encode, to_wire
from fedlib.secagg.protocol import Session, mask_update, open_inbox
from fedlib.secagg.quantised import Codes
from fedlib.secagg.weights import WeightRule
from fedlib.wire.keys import KeyRing


@dataclass(frozen=True)
class SecureRound:
    """The aggregator's session for this round and the setup messages it relayed to me."""

    ring: KeyRing
    session: Session
    inbox: Mapping[str, str]
    weight_scale: float  # Σ of every participant's weight, announced by the aggregator
    code_scale: float = 0.0  # the value of code 1 with `secure_aggregation.bits`, announced too
    max_examples: int = 0  # the count my weight is capped to, announced so no client outweighs its share; 0: none
    parent: str = ""  # the digest of the global adapter I trained from: it fixes my DP noise for the round


@dataclass(frozen=True)
class MaskSettings:
    """What masking reads of the config: the weight rule, DP (its noise is added by each client
    under masking), the fixed-point precision or low-bit codes, and the fewest survivors a round
    completes with (each client's share of the noise)."""

    rule: WeightRule
    privacy: PrivacyConfig
    frac_bits: int
    bits: int | None
    min_survivors: int


@dataclass(frozen=True)
class MaskedUpdate:
    tensors: Tensors  # what is uploaded: int32 residues, or packed low-bit residues
    weight: int
    counted: Tensors | None  # the delta as the aggregator will count it, when codes lose some of it


def masked_update(
    settings: MaskSettings,
    me: str,
    delta: Tensors,
    num_examples: int,
    local_steps: int,
    secure: SecureRound,
    rounding: torch.Generator | None = None,
) -> MaskedUpdate:
    """The masked update, and the weight it carries.

    Each client encodes its share (`WeightRule.share`) of its delta, so the unmasked sum is already
    the mean when nobody drops, and every encoded value is at most the largest delta entry: the
    fixed-point range does not depend on the shard sizes. With DP each client also adds its share
    of the Gaussian noise, since the aggregator never sees an update to add noise to. With
    `secure_aggregation.bits` the encoding is low-bit codes at the announced scale, stochastically
    rounded by `rounding` (`fedlib.secagg.quantised`)."""
    peers = open_inbox(secure.ring, me, secure.session, secure.inbox)
    p = settings.privacy
    weighted = {name: value.detach().to(torch.float64).clone() for name, value in delta.items()}
    if p.enabled:
        generator = (
            noise_generator(p.noise_seed, secure.session.round, me)  # tests only
            if p.noise_seed is not None
            else release_noise_generator(
                secure.ring.client_derived_secret(me, "dp-noise"), secure.session.federation, secure.session.round, secure.parent
            )
        )
        add_noise_share_inplace(weighted, p.noise_multiplier * p.clip_norm, settings.min_survivors, generator)
    rule = settings.rule
    weight = rule.weight(num_examples)
    share = rule.share(weight, secure.weight_scale, local_steps)
    for value in weighted.values():
        value.mul_(share)
    bits = settings.bits
    if bits is None:
        encoded = encode(weighted, settings.frac_bits, parties=len(peers) + 1)
        return MaskedUpdate(to_wire(mask_update(secure.ring, me, secure.session, peers, encoded)), weight, None)
    if not secure.code_scale > 0:  # an aggregator that announced no scale gets no update
        raise ValueError(f"secure_aggregation.bits={bits}: the aggregator announced code scale {secure.code_scale}")
    codes = Codes(bits, len(peers) + 1, secure.code_scale)
    quantised = codes.quantise(weighted, rounding or torch.Generator().manual_seed(0))
    masked = mask_update(secure.ring, me, secure.session, peers, {n: torch.remainder(q, MODULUS) for n, q in quantised.items()})
    counted = {n: (q.to(torch.float64) * codes.scale / share).to(delta[n].dtype) for n, q in quantised.items()}
    return MaskedUpdate(codes.pack(masked), weight, counted)
