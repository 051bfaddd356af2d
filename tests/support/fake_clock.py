"""A fake clock for ``DynamicBatcher.clock``: every reading advances by ``step`` seconds, so every batch
measures about ``step`` whatever the machine's load (a batch reads the clock twice)."""

from __future__ import annotations

import threading


class TickingClock:
    """Readings 0, step, 2·step, …; thread-safe (batches run on the loop and on the inference thread).
    Not a function, so it can replace ``DynamicBatcher.clock`` on the class too (no method binding)."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.readings = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.readings += 1
            return self.readings * self.step
