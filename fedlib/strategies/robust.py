"""Aggregators that a few poisoned updates cannot drag far: coordinate-wise median, trimmed
mean (Yin et al., 2018) and (multi-)Krum (Blanchard et al., 2017).

They compare updates with each other, so they hold every update of the round in memory
(O(clients × adapter)), and they weigh clients equally: an example count is exactly what a
poisoned client would inflate.
"""

from __future__ import annotations

import math
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


def _stacked(round_number: int, updates: Iterable[ClientUpdate], least: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Each tensor name → [clients, *shape] in float64."""
    held = list(updates)
    if len(held) < least:
        raise ValueError(f"round {round_number}: {len(held)} updates, this aggregator needs at least {least}")
    names = list(held[0].delta)
    return [u.client for u in held], {n: torch.stack([u.delta[n].to(torch.float64) for u in held]) for n in names}


@strategies.register("median")
class CoordinateMedian(Stateless):
    """Per coordinate, the median of the clients' values (the mean of the middle two when even)."""

    from_mean_only = False

    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors:
        _, stacked = _stacked(round_number, updates, 1)
        return add_delta(global_state, {name: torch.quantile(v, 0.5, dim=0) if v.numel() else v[0] for name, v in stacked.items()})


@strategies.register("trimmed_mean")
@dataclass
class TrimmedMean(Stateless):
    """Per coordinate, drop the ⌊trim·n⌋ largest and smallest values, average the rest."""

    from_mean_only = False

    trim: float = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")

    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors:
        _, stacked = _stacked(round_number, updates, 1)
        n = next(iter(stacked.values())).shape[0]
        cut = math.floor(self.trim * n)
        out = {name: torch.sort(v, dim=0).values[cut : n - cut].mean(dim=0) for name, v in stacked.items()}
        return add_delta(global_state, out)


@strategies.register("krum")
@dataclass
class Krum(Stateless):
    """Score each update by the summed squared distance to its n − f − 2 nearest others; keep
    the `select` best-scored and average them (`select=1` is Krum, more is multi-Krum)."""

    from_mean_only = False

    byzantine: int = 1
    select: int = 1

    def __post_init__(self) -> None:
        if self.byzantine < 0 or self.select < 1:
            raise ValueError("need byzantine >= 0 and select >= 1")

    def chosen(self, round_number: int, updates: Iterable[ClientUpdate]) -> tuple[list[str], dict[str, torch.Tensor]]:
        clients, stacked = _stacked(round_number, updates, 2 * self.byzantine + 3)
        flat = torch.cat([v.reshape(len(clients), -1) for v in stacked.values()], dim=1)
        distances = torch.cdist(flat, flat).pow(2)
        neighbours = len(clients) - self.byzantine - 2
        # Each row's own zero distance sorts first; skip it.
        scores = torch.sort(distances, dim=1).values[:, 1 : neighbours + 1].sum(dim=1)
        keep = torch.argsort(scores)[: min(self.select, len(clients))]
        return [clients[i] for i in keep.tolist()], {name: v[keep] for name, v in stacked.items()}

    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors:
        _, kept = self.chosen(round_number, updates)
        return add_delta(global_state, {name: v.mean(dim=0) for name, v in kept.items()})
