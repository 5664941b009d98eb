"""A client's masked update: what it uploads instead of its delta when secure aggregation is on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlib.config import FederationConfig
from fedlib.keys import KeyRing
from fedlib.privacy.dp import add_noise_share_inplace, noise_generator
from fedlib.secagg.fixedpoint import Tensors, encode, to_wire
from fedlib.secagg.protocol import Session, mask_update, open_inbox


@dataclass(frozen=True)
class SecureRound:
    """The aggregator's session for this round and the setup messages it relayed to me."""

    ring: KeyRing
    session: Session
    inbox: Mapping[str, str]
    weight_scale: float  # Σ of every participant's weight, announced by the aggregator


def masked_update(
    config: FederationConfig, me: str, delta: Tensors, num_examples: int, local_steps: int, secure: SecureRound
) -> tuple[Tensors, int]:
    """The masked, fixed-point update as int32 residues, and the weight it carries.

    Each client encodes weight/weight_scale · delta, so the unmasked sum is already the mean when
    nobody drops, and every encoded value is at most the largest delta entry: the fixed-point
    range does not depend on the shard sizes. Without DP the weight is the example count
    (FedAvg). With DP every client weighs 1 (as DP-FedAvg does) and adds its share of the
    Gaussian noise, since the aggregator never sees an update to add noise to."""
    peers = open_inbox(secure.ring, me, secure.session, secure.inbox)
    p = config.privacy
    weighted = {name: value.detach().to(torch.float64).clone() for name, value in delta.items()}
    if p.enabled:
        weight = 1
        generator = noise_generator(p.noise_seed, secure.session.round, me)
        add_noise_share_inplace(weighted, p.noise_multiplier * p.clip_norm, config.secagg_min_survivors, generator)
    else:
        weight = num_examples
    per_step = local_steps if config.aggregation.normalize_steps else 1  # FedNova: Δ/τ, rescaled by the aggregator
    for value in weighted.values():
        value.mul_(weight / secure.weight_scale / per_step)
    encoded = encode(weighted, config.secure_aggregation.frac_bits, parties=len(peers) + 1)
    return to_wire(mask_update(secure.ring, me, secure.session, peers, encoded)), weight
