"""Secure aggregation's weight rule, in one place for every party that applies it.

The aggregator never sees an update, so the weighting FedAvg does after the fact happens before
masking instead: the flow announces Σ of the participants' weights, each client multiplies its
delta by weight / Σ before masking (so the unmasked sum is the mean when nobody drops), and the
aggregator holds each client to the weight its role allows and rescales the sum by the weight
that survived. Three parties, one rule: this class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedlib.rejection import Reason, UpdateRejected


@dataclass(frozen=True)
class WeightRule:
    """`dp`: under differential privacy every client weighs 1 (DP-FedAvg), otherwise its example
    count (FedAvg). `normalize_steps`: FedNova's Δ/τ, each client dividing by its local steps and
    the aggregator multiplying the mean by the weighted mean step count."""

    dp: bool
    normalize_steps: bool

    def weight(self, num_examples: int) -> int:
        return 1 if self.dp else num_examples

    def announced(self, examples: Mapping[str, int]) -> tuple[dict[str, int], float]:
        """Each participant's weight (from the example count it said at setup, already capped)
        and the scale the aggregator announces: their sum."""
        weights = {client: self.weight(count) for client, count in examples.items()}
        return weights, float(sum(weights.values()))

    def share(self, weight: int, scale: float, local_steps: int) -> float:
        """What a client multiplies its delta by before masking."""
        return weight / scale / (local_steps if self.normalize_steps else 1)

    def check(self, weight: int, num_examples: int) -> None:
        """A masked update's weight must be the one its role allows: it scales the mean."""
        if weight != self.weight(num_examples):
            raise UpdateRejected(Reason.OUT_OF_RANGE, f"masked update: weight {weight} for {num_examples} examples")

    def mean_factor(self, scale: float, total_weight: int, weighted_steps: int) -> float:
        """What turns the unmasked sum of the survivors into their (step-normalised) weighted mean."""
        factor = scale / total_weight
        return factor * weighted_steps / total_weight if self.normalize_steps else factor
