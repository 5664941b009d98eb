"""ε for the rounds run so far, from opacus's RDP accountant (not a hand-written one).

One federated round is one step of the subsampled Gaussian mechanism, with the sampling rate
being the fraction of clients that take part (`federation.clients_per_round` over the clouds;
1.0 when every client trains every round). opacus analyses Poisson sampling; sampling a fixed
k of n, as the federation does, is the usual close approximation.
"""

from __future__ import annotations

from opacus.accountants import RDPAccountant

from fedlib.config import FederationConfig


def epsilon_after(rounds: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    if rounds <= 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))


def privacy_spent(config: FederationConfig, round_number: int) -> dict[str, float]:
    """What a round's manifest records: ε and δ after `round_number` DP rounds (nothing when off)."""
    privacy = config.privacy
    if not privacy.enabled:
        return {}
    epsilon = epsilon_after(round_number, privacy.noise_multiplier, config.client_sample_rate, privacy.delta)
    return {"epsilon": epsilon, "delta": privacy.delta}


def over_budget(config: FederationConfig, round_number: int) -> float | None:
    """The ε that running `round_number` would reach, if that passes the budget; else None."""
    privacy = config.privacy
    if not (privacy.enabled and privacy.epsilon_budget):
        return None
    epsilon = epsilon_after(round_number, privacy.noise_multiplier, config.client_sample_rate, privacy.delta)
    return epsilon if epsilon > privacy.epsilon_budget else None


def rounds_within_budget(budget: float, noise_multiplier: float, sample_rate: float, delta: float, limit: int = 10_000) -> int:
    """How many rounds fit in an ε budget (0 if not even one)."""
    rounds = 0
    while rounds < limit and epsilon_after(rounds + 1, noise_multiplier, sample_rate, delta) <= budget:
        rounds += 1
    return rounds
