"""The one way locksafe remembers things: :class:`Memo` (bounded, by key) and
:class:`IdentityMemo` (by object, weak: an entry goes when its object does).

Every cache registers itself by name, so :func:`clear_all` empties them all at once (tests, a
forked child that must not share a parent's state) and :func:`sizes` shows them.

Vocabulary layer: imports nothing of locksafe.

>>> squares = Memo[int, int]("doc.squares", maxsize=2)
>>> squares.get_or_make(3, lambda n: n * n)
9
>>> len(squares)
1
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["IdentityMemo", "Memo", "clear_all", "sizes"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
V = TypeVar("V")

_registry: dict[str, Memo[Any, Any] | IdentityMemo[Any, Any]] = {}
_registry_lock = threading.Lock()


def _register(cache: Memo[Any, Any] | IdentityMemo[Any, Any]) -> None:
    with _registry_lock:
        _registry[cache.name] = cache


class Memo(Generic[K, V]):
    """Values by key, at most ``maxsize`` of them (``None``: unbounded, for keys from a small
    fixed set such as dialect names). When full, it starts over: entries in use come back at
    once, and keys made on the fly (exception classes, statements) never fill it for good nor
    stay alive through it. Unhashable keys are not remembered (``make`` runs each time).

    Safe to share between threads: a race makes a value twice, never a wrong one.
    """

    __slots__ = ("_data", "maxsize", "name")

    def __init__(self, name: str, *, maxsize: int | None = 1024) -> None:
        if maxsize is not None and (not isinstance(maxsize, int) or maxsize < 1):
            raise ValueError(f"maxsize={maxsize!r} must be a positive int or None")
        self.name = name
        self.maxsize = maxsize
        self._data: dict[K, V] = {}
        _register(self)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._data
        except TypeError:
            return False

    def get(self, key: K, default: V | None = None) -> V | None:
        try:
            return self._data.get(key, default)
        except TypeError:
            return default

    def put(self, key: K, value: V) -> V:
        try:
            if self.maxsize is not None and len(self._data) >= self.maxsize:
                self._data.clear()
            self._data[key] = value
        except TypeError:
            pass
        return value

    def get_or_make(self, key: K, make: Callable[[K], V]) -> V:
        try:
            return self._data[key]
        except KeyError:
            return self.put(key, make(key))
        except TypeError:
            return make(key)

    def clear(self) -> None:
        self._data.clear()


class IdentityMemo(Generic[T, V]):
    """Values by object identity, held weakly: an entry goes when its object is collected, and
    never keeps it alive. Keyed by ``id()`` and checked through the weak reference, so a
    lookup costs one dict access (it is on the path of every statement an application runs).
    Objects that cannot be weakly referenced are not remembered."""

    __slots__ = ("_data", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._data: dict[int, tuple[weakref.ref[Any], V]] = {}
        _register(self)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, obj: T) -> V | None:
        entry = self._data.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        return None

    def put(self, obj: T, value: V) -> V:
        key = id(obj)
        try:
            reference = weakref.ref(obj, functools.partial(self._forget, key))
        except TypeError:
            return value
        self._data[key] = (reference, value)
        return value

    def _forget(self, key: int, reference: weakref.ref[Any]) -> None:
        entry = self._data.get(key)
        if entry is not None and entry[0] is reference:
            del self._data[key]

    def clear(self) -> None:
        self._data.clear()


def clear_all() -> None:
    """Empty every locksafe cache."""
    with _registry_lock:
        caches = list(_registry.values())
    for cache in caches:
        cache.clear()


def sizes() -> dict[str, int]:
    """How many entries each cache holds, by name."""
    with _registry_lock:
        return {name: len(cache) for name, cache in sorted(_registry.items())}
