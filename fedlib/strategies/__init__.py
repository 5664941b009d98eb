"""Aggregation strategies; importing this package registers the built-in ones."""

from fedlib.strategies import fedavg, fedopt, lora_exact, robust  # noqa: F401  (they register themselves)
from fedlib.strategies.base import ClientUpdate, Stateless, Strategy, make_strategy, strategies

__all__ = ["ClientUpdate", "Stateless", "Strategy", "make_strategy", "strategies"]
