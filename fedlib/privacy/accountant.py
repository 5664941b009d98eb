"""ε for the rounds run so far, from opacus's RDP accountant (not a hand-written one).

One federated round is one step of the subsampled Gaussian mechanism, with the sampling rate
being the fraction of clients that take part (1.0 while every client trains every round).
"""

from __future__ import annotations

from opacus.accountants import RDPAccountant


def epsilon_after(rounds: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    if rounds <= 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))


def rounds_within_budget(budget: float, noise_multiplier: float, sample_rate: float, delta: float, limit: int = 10_000) -> int:
    """How many rounds fit in an ε budget (0 if not even one)."""
    rounds = 0
    while rounds < limit and epsilon_after(rounds + 1, noise_multiplier, sample_rate, delta) <= budget:
        rounds += 1
    return rounds
