"""One registry class for every kind of named component (advantages, losses, KL, rewards...).

A new algorithm is one function plus one decorator; an unknown name fails with the known
names listed, close matches first.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from rlhf.errors import ConfigError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Name -> callable table for one kind of component."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def check(self, name: str, field: str = "") -> None:
        """Raise ConfigError naming `field` when `name` is not registered."""
        if name not in self._entries:
            where = f"{field}: " if field else ""
            raise ConfigError(where + self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        ordered = close + [k for k in known if k not in close]
        return f"unknown {self.kind} {name!r}; known: {', '.join(ordered)}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
