"""ε for the rounds run so far, from opacus's RDP accountant (not a hand-written one).

Honest about sampling: a round's sample is drawn from the federation's seed and written into
every manifest, so it is public, and amplification by subsampling (which needs a sample the
adversary does not know) does not apply. Each client is therefore accounted at q = 1 over the
rounds it actually took part in, and the federation reports the worst client: with 10 clouds,
2 per round and z = 1 over 50 rounds, that is ε ≈ 24.8 for a client sampled 15 times, where
crediting q = 0.2 would have claimed 11.3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedlib.config import PrivacyConfig


def epsilon_after(rounds: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    if rounds <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant  # here: opacus takes seconds to import, and only DP runs need it

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))


def participation_after(previous: Mapping[str, int], sampled: Iterable[str]) -> dict[str, int]:
    """Rounds each client has taken part in, counting this round's sample."""
    counts = dict(previous)
    for client in sampled:
        counts[client] = counts.get(client, 0) + 1
    return counts


@dataclass(frozen=True)
class PrivacySpent:
    """What a round's manifest records under DP: the worst client's ε at δ, which client that
    is, and how many rounds each client has taken part in (the next round's accounting starts
    from these)."""

    epsilon: float
    delta: float
    client: str | None
    participation: dict[str, int] = field(default_factory=dict)


def privacy_spent(privacy: PrivacyConfig, participation: Mapping[str, int]) -> PrivacySpent | None:
    """The worst client's ε (q = 1 over its rounds); None when DP is off."""
    if not privacy.enabled:
        return None
    worst = max(sorted(participation), key=lambda c: participation[c], default=None)
    rounds = participation.get(worst, 0) if worst is not None else 0
    epsilon = epsilon_after(rounds, privacy.noise_multiplier, 1.0, privacy.delta)
    return PrivacySpent(epsilon, privacy.delta, worst, dict(participation))


def over_budget(privacy: PrivacyConfig, participation: Mapping[str, int]) -> float | None:
    """The ε the worst client would reach by taking part in one more round, if that passes the
    budget; else None."""
    if not (privacy.enabled and privacy.epsilon_budget):
        return None
    rounds = max(participation.values(), default=0) + 1
    epsilon = epsilon_after(rounds, privacy.noise_multiplier, 1.0, privacy.delta)
    return epsilon if epsilon > privacy.epsilon_budget else None


def rounds_within_budget(budget: float, noise_multiplier: float, sample_rate: float, delta: float, limit: int = 10_000) -> int:
    """How many rounds fit in an ε budget (0 if not even one)."""
    rounds = 0
    while rounds < limit and epsilon_after(rounds + 1, noise_multiplier, sample_rate, delta) <= budget:
        rounds += 1
    return rounds
