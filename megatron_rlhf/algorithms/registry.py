"""Name -> implementation tables, so configs select algorithm components by a string.

One :class:`Registry` per kind of component (advantage estimators, loss reductions, KL
estimators, KL controllers, reward normalisations). Looking up an unknown name raises
:class:`~megatron_rlhf.algorithms.errors.UnknownNameError` listing what is registered; registering
a name twice raises too, so two modules can never silently shadow each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from megatron_rlhf.algorithms.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """An insertion-ordered table of named implementations of one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        """What the entries are, for error messages (e.g. "advantage estimator")."""
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; raises ValueError if the name is taken."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorate(entry: T) -> T:
            return self.add(name, entry)

        return decorate

    def get(self, name: str) -> T:
        """The entry registered as ``name``; raises UnknownNameError naming the choices."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}"
            ) from None

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
