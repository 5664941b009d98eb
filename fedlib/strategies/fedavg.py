"""FedAvg (McMahan et al., 2017): the example-weighted mean of client deltas. FedProx (Li et al.,
2020) aggregates the same way; its proximal term lives in the clients' training."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedlib.strategies.base import (
    ClientUpdate,
    Stateless,
    Tensors,
    add_delta,
    strategies,
)


def weighted_delta_sum(updates: Iterable[ClientUpdate]) -> tuple[Tensors, int, int]:
    """Σ n_k·Δ_k accumulated one update at a time (float64, so the order of clients does not
    change the result beyond rounding), with Σ n_k and the number of updates."""
    total: Tensors = {}
    examples = count = 0
    for update in updates:
        if update.num_examples <= 0:
            raise ValueError(f"client {update.client!r} reports {update.num_examples} examples")
        for name, delta in update.delta.items():
            scaled = delta.to(torch.float64) * update.num_examples
            total[name] = total[name] + scaled if name in total else scaled
        examples += update.num_examples
        count += 1
    return total, examples, count


def weighted_mean_delta(round_number: int, updates: Iterable[ClientUpdate]) -> Tensors:
    total, examples, count = weighted_delta_sum(updates)
    if count == 0:
        raise ValueError(f"round {round_number}: no updates to aggregate")
    return {name: value / examples for name, value in total.items()}


@strategies.register("fedavg")
class FedAvg(Stateless):
    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors:
        return add_delta(global_state, weighted_mean_delta(round_number, updates))


@strategies.register("fedprox")
@dataclass
class FedProx(FedAvg):
    """`mu` weighs the clients' proximal term μ/2·‖w − w_global‖², which keeps non-IID clients
    from drifting far from the global adapter in their local steps."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")
