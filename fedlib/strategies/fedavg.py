"""FedAvg (McMahan et al., 2017): the example-weighted mean of client deltas."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedlib.strategies.base import ClientUpdate, Tensors, strategies


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


@strategies.register("fedavg")
class FedAvg:
    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors:
        total, examples, count = weighted_delta_sum(updates)
        if count == 0:
            raise ValueError(f"round {round_number}: no updates to aggregate")
        return {
            name: (value.to(torch.float64) + total[name] / examples).to(value.dtype)
            for name, value in global_state.items()
        }
