"""A small thread-safe LRU cache bounded by total size (bytes, or 1 per item to bound the count)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LruCache(Generic[V]):
    """Keeps the most recently used values while their summed ``size`` stays within ``limit``.

    A value larger than ``limit`` on its own is returned to the caller but not kept, so the cache never
    holds more than ``limit`` at any moment.
    """

    def __init__(self, limit: int, size: Callable[[V], int] = lambda _v: 1) -> None:
        if limit < 0:
            raise ValueError(f"LruCache: limit={limit}; use a limit >= 0")
        self.limit = limit
        self._size = size
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.total = 0  # summed size of the values held now
        self.peak = 0  # largest ``total`` ever held
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> V | None:
        """The value of ``key`` (now the most recently used), or None."""
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: V) -> V:
        """Store ``value`` under ``key`` (evicting the least recently used as needed); returns ``value``."""
        n = self._size(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.total -= old[1]
            if n > self.limit:
                return value
            while self._items and self.total + n > self.limit:
                _, (_, m) = self._items.popitem(last=False)
                self.total -= m
                self.evictions += 1
            self._items[key] = (value, n)
            self.total += n
            self.peak = max(self.peak, self.total)
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.total = 0
