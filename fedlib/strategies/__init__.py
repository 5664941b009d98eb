"""Aggregation strategies; importing this package registers the built-in ones."""

from fedlib.strategies import fedavg  # noqa: F401  (registers "fedavg")
from fedlib.strategies.base import ClientUpdate, Strategy, make_strategy, strategies

__all__ = ["ClientUpdate", "Strategy", "make_strategy", "strategies"]
