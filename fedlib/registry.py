"""Named components (strategies, partitioners) found by the name a config gives.

One registry per kind; a plugin adds to it with `register`, and re-using a name is an error
rather than a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    @property
    def items(self) -> Mapping[str, T]:
        """A read-only view, so callers cannot bypass `register`'s overwrite check."""
        return MappingProxyType(self._items)
