"""The aggregation protocol every strategy implements, on plain tensors.

A client sends a *delta* (its trained adapter minus the global adapter it started from); a
strategy turns the global adapter and an iterable of deltas into the next global adapter.
Taking an iterable lets the aggregator stream updates one at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from fedlib.registry import Registry

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    client: str
    num_examples: int
    delta: Tensors


class Strategy(Protocol):
    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors: ...


strategies: Registry[type] = Registry("strategy")


def make_strategy(name: str) -> Strategy:
    return strategies.get(name)()
