"""Serving has priority over training: a gate that training steps wait at while requests run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class PriorityGate:
    """Counts in-flight serving work; training calls `yield_to_serving()` between steps.

    A training step waits while any serving work is in flight, up to `max_wait` seconds, so that
    under a constant stream of requests training still advances (slowly) instead of starving.
    """

    def __init__(self, max_wait: float = 0.5) -> None:
        self.max_wait = max_wait
        self._active = 0
        self._cond = threading.Condition()
        self.waited_seconds = 0.0  # total time training spent yielding (for metrics and tests)

    @contextmanager
    def serving(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    @property
    def busy(self) -> bool:
        return self._active > 0

    def yield_to_serving(self) -> float:
        """Block while serving work is in flight (at most max_wait). Returns seconds waited."""
        if self._active == 0:
            return 0.0
        start = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0, timeout=self.max_wait)
        waited = time.perf_counter() - start
        self.waited_seconds += waited
        return waited
