"""The aggregation protocol every strategy implements, on plain tensors.

A client sends a *delta* (its trained adapter minus the global adapter it started from); a
strategy turns the global adapter and an iterable of deltas into the next global adapter.
Taking an iterable lets the aggregator stream updates one at a time; the strategies that must
compare updates (median, Krum) hold them all, and say so.

Server optimisers keep state between rounds (momentum, second moments). `state_dict` and
`load_state_dict` move it through the checkpoint store, so a resumed federation continues with
the same state rather than a cold optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedlib.registry import Registry

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    client: str
    num_examples: int
    delta: Tensors
    local_steps: int = 1


class Strategy(Protocol):
    from_mean_only: bool  # True when the weighted mean of the deltas is all it needs

    def aggregate(self, round_number: int, global_state: Tensors, updates: Iterable[ClientUpdate]) -> Tensors: ...

    def state_dict(self) -> Tensors: ...

    def load_state_dict(self, state: Tensors) -> None: ...


class Stateless:
    """For strategies whose next adapter depends on this round's updates alone."""

    from_mean_only = True

    def state_dict(self) -> Tensors:
        return {}

    def load_state_dict(self, state: Tensors) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)[:3]}")


strategies: Registry[type] = Registry("strategy")


def make_strategy(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """`options` are the strategy's keyword arguments (`aggregation.options` in the config)."""
    cls = strategies.get(name)
    try:
        return cls(**dict(options or {}))
    except TypeError as err:
        raise ValueError(f"{name!r}: {err}") from None


def add_delta(global_state: Tensors, delta: Tensors) -> Tensors:
    """global + delta, in the global adapter's dtypes (accumulation happens in float64)."""
    return {name: (value.to(torch.float64) + delta[name]).to(value.dtype) for name, value in global_state.items()}
