"""Dynamic micro-batching: concurrent predict requests (any mix of adapters) run together.

Requests queue up; one runner takes up to `max_batch` rows, waiting at most `max_wait_ms` after
the first row arrived for more to join, sorts the rows by length into buckets (less padding), runs
each bucket as one mixed-adapter forward pass in a worker thread, and hands every request its rows
back in order.

Overload is shed at the door, not by letting latency grow: a request is refused with 429 (and a
Retry-After of the expected drain time) when the queue holds `max_queue` rows, or when the rows
ahead of it would take longer than `max_queue_wait_ms` at the throughput measured on recent batches.
Accepted requests therefore wait at most about that long. Requests whose client went away before
their batch ran are dropped from the queue instead of being computed for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from loradock.adapters.serving.engine import Engine, RowResult
from loradock.adapters.serving.slots import Resident
from loradock.service.errors import NotReady, TooManyRequests
from loradock.service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    resident: Resident
    texts: list[str]
    future: asyncio.Future[list[RowResult]]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What the last batches looked like (read by metrics and tests)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    queue_seconds: float = 0.0


class MicroBatcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        max_queue_wait_ms: float = 0.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_wait = max_queue_wait_ms / 1000.0  # 0 = no wait-based shedding
        # Throughput of recent batches: decayed sums of rows and of seconds spent computing them.
        self._recent_rows = 0.0
        self._recent_seconds = 0.0
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loradock-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def rows_per_second(self) -> float | None:
        """Measured throughput of recent batches (None before the first batch)."""
        if self._recent_seconds <= 0:
            return None
        return self._recent_rows / self._recent_seconds

    def expected_wait(self, extra_rows: int = 0) -> float | None:
        """Seconds until the queued rows (plus `extra_rows`) have run, at the measured rate."""
        rate = self.rows_per_second
        return None if rate is None else (self._queued_rows + extra_rows) / rate

    def _retry_after(self) -> int:
        wait = self.expected_wait() or 0.0
        return max(1, math.ceil(wait))

    def over_wait_limit(self, extra_rows: int = 0) -> TooManyRequests | None:
        """The 429 for a request of `extra_rows` rows if the rows queued ahead of it would take
        longer than `max_queue_wait` at the measured throughput, else None. Also used at the door
        (OverloadShedMiddleware), before a request is even parsed."""
        if self.max_queue_wait <= 0 or not self._queue:
            return None
        wait = self.expected_wait(extra_rows)
        if wait is None or wait <= self.max_queue_wait:
            return None
        return TooManyRequests(
            f"the server is at capacity: {self._queued_rows} rows are waiting, about "
            f"{wait:.1f} s of work, more than the {self.max_queue_wait:.1f} s allowed "
            "(setting LORADOCK_MAX_QUEUE_WAIT_MS); retry later",
            retry_after=self._retry_after(),
        )

    async def submit(self, resident: Resident, texts: Sequence[str]) -> list[RowResult]:
        if self._closed:
            raise NotReady("the server is shutting down")
        if self._queued_rows + len(texts) > self.max_queue:
            raise TooManyRequests(
                f"the predict queue holds {self._queued_rows} rows, the limit is "
                f"{self.max_queue} (setting LORADOCK_MAX_QUEUE_ROWS); retry shortly",
                retry_after=self._retry_after(),
            )
        overloaded = self.over_wait_limit(len(texts))
        if overloaded is not None:
            raise overloaded
        future: asyncio.Future[list[RowResult]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(resident, list(texts), future))
        self._queued_rows += len(texts)
        if self.metrics is not None:
            self.metrics.queue_rows.set(self._queued_rows)
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for more rows to join, up to max_wait after the oldest one arrived.
            deadline = self._queue[0].enqueued + self.max_wait
            while self._queued_rows < self.max_batch and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            taken = self._take()
            try:
                await self._execute(taken)
            except Exception as e:  # never let one bad batch stop the runner
                log.exception("batch failed")
                for p in taken:
                    if not p.future.done():
                        p.future.set_exception(e)

    def _take(self) -> list[_Pending]:
        """Whole requests, oldest first, up to max_batch rows (a bigger request goes alone)."""
        taken: list[_Pending] = []
        rows = 0
        while self._queue:
            nxt = self._queue[0]
            if nxt.future.done():  # the client went away (request cancelled): skip its rows
                self._queue.popleft()
                self._queued_rows -= len(nxt.texts)
                continue
            if taken and rows + len(nxt.texts) > self.max_batch:
                break
            taken.append(self._queue.popleft())
            rows += len(nxt.texts)
            self._queued_rows -= len(nxt.texts)
        if self.metrics is not None:
            self.metrics.queue_rows.set(self._queued_rows)
        return taken

    async def _execute(self, taken: list[_Pending]) -> None:
        now = time.perf_counter()
        rows = [(p, i) for p in taken for i in range(len(p.texts))]
        for p in taken:
            self.stats.queue_seconds += now - p.enqueued
            if self.metrics is not None:
                self.metrics.queue_seconds.observe(now - p.enqueued)
        # Bucket by length: sorted rows, cut where the text length more than doubles.
        rows.sort(key=lambda r: len(r[0].texts[r[1]]))
        buckets: list[list[tuple[_Pending, int]]] = [[]]
        for row in rows:
            bucket = buckets[-1]
            if bucket and (
                len(bucket) >= self.max_batch
                or (
                    len(row[0].texts[row[1]]) > 2 * len(bucket[0][0].texts[bucket[0][1]]) + 32
                    and len(bucket) >= 8
                )
            ):
                buckets.append([])
            buckets[-1].append(row)
        results: dict[int, list[RowResult | None]] = {id(p): [None] * len(p.texts) for p in taken}
        for bucket in buckets:
            residents = [p.resident for p, _ in bucket]
            texts = [p.texts[i] for p, i in bucket]
            started = time.perf_counter()
            out = await asyncio.to_thread(self.engine.run, residents, texts)
            if self.metrics is not None:
                self.metrics.inference_seconds.observe(time.perf_counter() - started)
                self.metrics.batch_rows.observe(len(bucket))
            for (p, i), r in zip(bucket, out, strict=True):
                results[id(p)][i] = r
            self.stats.batches += 1
            self.stats.rows += len(bucket)
            self.stats.largest = max(self.stats.largest, len(bucket))
        self._observe_throughput(len(rows), time.perf_counter() - now)
        for p in taken:
            if not p.future.done():
                p.future.set_result([r for r in results[id(p)] if r is not None])

    def _observe_throughput(self, rows: int, seconds: float, decay: float = 0.8) -> None:
        self._recent_rows = self._recent_rows * decay + rows
        self._recent_seconds = self._recent_seconds * decay + seconds
