"""Step-normalised averaging in the spirit of FedNova (Wang et al., NeurIPS 2020).

When clouds run different numbers of local steps, plain FedAvg leans towards the clients that
took more steps: their deltas are longer. Dividing each delta by its step count τ_k and scaling
the weighted mean back by the mean step count τ_eff = Σ p_k τ_k removes that bias while keeping
the step size of an average client.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedlib.strategies.base import ClientUpdate, Strategy, Tensors


class StepNormalized:
    """Wraps a strategy that needs only the mean; hands it the normalised mean as one update."""

    def __init__(self, inner: Strategy) -> None:
        if not inner.from_mean_only:
            raise ValueError(f"{type(inner).__name__} compares individual updates; step normalisation needs a mean-based strategy")
        self.inner = inner
        self.from_mean_only = True

    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors:
        total: Tensors = {}
        examples = weighted_steps = 0
        for update in updates:
            if update.local_steps <= 0:
                raise ValueError(f"client {update.client!r} reports {update.local_steps} local steps")
            factor = update.num_examples / update.local_steps
            for name, delta in update.delta.items():
                scaled = delta.to(torch.float64) * factor
                total[name] = total[name] + scaled if name in total else scaled
            examples += update.num_examples
            weighted_steps += update.num_examples * update.local_steps
        if examples == 0:
            raise ValueError(f"round {round_number}: no updates to aggregate")
        tau_eff = weighted_steps / examples
        mean = {name: value * (tau_eff / examples) for name, value in total.items()}
        return self.inner.aggregate(round_number, global_state, [ClientUpdate("step-normalised-mean", examples, mean, round(tau_eff))])

    def state_dict(self) -> Tensors:
        return self.inner.state_dict()

    def load_state_dict(self, state: Tensors) -> None:
        self.inner.load_state_dict(state)
