"""Dynamic micro-batching with fair scheduling: concurrent predict requests (any mix of adapters
and tenants) share forward passes, and a big request costs its sender, not everyone.

Requests arrive already tokenized, so everything here is counted in tokens. Each forward pass is
built row by row, round-robin across tenants (and across each tenant's requests), up to
`max_batch` rows and `max_batch_tokens` padded tokens; each request's rows go shortest first
(less padding). A 256-text request of long texts therefore runs as many small passes, and a
one-text request of another tenant joins the next pass instead of waiting for all of them. The
runner waits at most `max_wait_ms` after the oldest row arrived for more rows to join.

Overload is shed at the door, not by letting latency grow: a request is refused with 429 (and a
Retry-After of the expected drain time) when the queue holds `max_queue` rows, or when the tokens
ahead of it would take longer than `max_queue_wait_ms` at the throughput measured on recent
passes. Requests whose client went away are dropped from the queue.

Failures are isolated: a pass that raises is retried request by request, so only the request
that cannot be computed fails; the others get their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry import trace

from loradock.adapters.core.tracing import tracer
from loradock.adapters.serving.engine import Engine, RowResult
from loradock.adapters.serving.slots import Resident
from loradock.service.errors import NotReady, TooManyRequests
from loradock.service.metrics import Metrics
from loradock.service.observability import current_request_id

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    """One request: its rows, which of them are scheduled, and the answers so far."""

    resident: Resident
    tenant: str
    ids: list[list[int]]
    future: asyncio.Future[list[RowResult]]
    enqueued: float = field(default_factory=time.perf_counter)
    # Who asked (captured in the request's task): the batch's log line and span name them.
    request_id: str | None = field(default_factory=current_request_id)
    trace_context: trace.SpanContext = field(
        default_factory=lambda: trace.get_current_span().get_span_context()
    )
    order: list[int] = field(init=False)  # row indices, shortest first
    next: int = 0  # rows of `order` already taken into a pass
    answered: int = 0
    results: list[RowResult | None] = field(init=False)

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))
        self.results = [None] * len(self.ids)

    @property
    def waiting_rows(self) -> int:
        return len(self.order) - self.next

    def waiting_tokens(self) -> int:
        return sum(len(self.ids[i]) for i in self.order[self.next :])


@dataclass
class BatchStats:
    """What the last batches looked like (read by metrics and tests)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    queue_seconds: float = 0.0
    isolated_failures: int = 0  # passes that raised and were retried request by request


class MicroBatcher:
    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        max_queue_wait_ms: float = 0.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_wait = max_queue_wait_ms / 1000.0  # 0 = no wait-based shedding
        # Throughput of recent passes: decayed sums of tokens and of seconds spent computing them.
        self._recent_tokens = 0.0
        self._recent_seconds = 0.0
        self.stats = BatchStats()
        # Per tenant, its requests with rows not yet taken (rotated to interleave them).
        self._tenants: OrderedDict[str, deque[_Pending]] = OrderedDict()
        self._queued_rows = 0
        self._queued_tokens = 0
        self._tenant_tokens: dict[str, int] = {}  # queued tokens per tenant
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

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
    def tokens_per_second(self) -> float | None:
        """Measured throughput of recent passes (None before the first pass)."""
        if self._recent_seconds <= 0:
            return None
        return self._recent_tokens / self._recent_seconds

    def expected_wait(self, tenant: str | None = None) -> float | None:
        """Seconds before a new request from `tenant` starts to run, at the measured rate.

        Passes are shared round-robin, so that is its tenant's own backlog plus, from every
        other tenant, at most as much as that (fair queueing): a big backlog of one tenant
        delays its own requests, not everyone's. The request's own size is not counted: the
        per-request token cap bounds that, and an idle server never refuses work."""
        rate = self.tokens_per_second
        if rate is None:
            return None
        mine = self._tenant_tokens.get(tenant or "", 0)
        others = sum(min(t, mine + 1) for u, t in self._tenant_tokens.items() if u != tenant)
        return (mine + others) / rate

    def _retry_after(self, tenant: str | None = None) -> int:
        wait = self.expected_wait(tenant) or 0.0
        return max(1, math.ceil(wait))

    def over_wait_limit(self, tenant: str | None = None) -> TooManyRequests | None:
        """The 429 for a new request from `tenant` if it would wait longer than
        `max_queue_wait` at the measured throughput, else None. Also used at the door
        (OverloadShedMiddleware), before a request is even parsed."""
        if self.max_queue_wait <= 0 or not self._tenants:
            return None
        wait = self.expected_wait(tenant)
        if wait is None or wait <= self.max_queue_wait:
            return None
        backlog = self._tenant_tokens.get(tenant or "", 0)
        return TooManyRequests(
            f"the server is at capacity for this tenant: {backlog} of its tokens are waiting "
            f"({self._queued_tokens} in all), about {wait:.1f} s of work before this request, "
            f"more than the {self.max_queue_wait:.1f} s allowed (setting "
            "LORADOCK_MAX_QUEUE_WAIT_MS); retry later",
            retry_after=self._retry_after(tenant),
        )

    async def submit(
        self, resident: Resident, ids: Sequence[Sequence[int]], tenant: str = ""
    ) -> list[RowResult]:
        """Run encoded rows through `resident`; `tenant` is the fairness key."""
        if self._closed:
            raise NotReady("the server is shutting down")
        if self._queued_rows + len(ids) > self.max_queue:
            raise TooManyRequests(
                f"the predict queue holds {self._queued_rows} rows, the limit is "
                f"{self.max_queue} (setting LORADOCK_MAX_QUEUE_ROWS); retry shortly",
                retry_after=self._retry_after(),
            )
        tokens = sum(len(row) for row in ids)
        overloaded = self.over_wait_limit(tenant)
        if overloaded is not None:
            raise overloaded
        if not ids:
            return []
        future: asyncio.Future[list[RowResult]] = asyncio.get_running_loop().create_future()
        pending = _Pending(resident, tenant, [list(row) for row in ids], future)
        self._tenants.setdefault(tenant, deque()).append(pending)
        self._queued_rows += len(ids)
        self._queued_tokens += tokens
        self._tenant_tokens[tenant] = self._tenant_tokens.get(tenant, 0) + tokens
        self._gauge()
        self._wakeup.set()
        return await future

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_rows.set(self._queued_rows)

    def _oldest(self) -> float:
        return min(q[0].enqueued for q in self._tenants.values() if q)

    async def _run(self) -> None:
        while True:
            # Requests abandoned while queued are dropped by _take; if that leaves nothing, the
            # next turn finds the queue empty and sleeps.
            if not self._tenants:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for more rows to join, up to max_wait after the oldest one arrived.
            deadline = self._oldest() + self.max_wait
            while self._queued_rows < self.max_batch and not self._closed:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch = self._take()
            if not batch:
                continue
            try:
                await self._execute(batch)
            except Exception:  # never let one bad pass stop the runner
                log.exception("batch failed outside the engine")
                for p in {p for p, _ in batch}:
                    self._fail(p, RuntimeError("internal error while batching"))

    def _drop_abandoned(self) -> None:
        """Forget requests whose client went away (their future was cancelled) or that failed."""
        for tenant in list(self._tenants):
            q = self._tenants[tenant]
            for p in [p for p in q if p.future.done()]:
                q.remove(p)
                self._queued_rows -= p.waiting_rows
                self._queued_tokens -= p.waiting_tokens()
                self._tenant_tokens[tenant] -= p.waiting_tokens()
            if not q:
                del self._tenants[tenant]
                self._tenant_tokens.pop(tenant, None)
        self._gauge()

    def _take(self) -> list[tuple[_Pending, int]]:
        """One forward pass: a row per tenant in turn (each tenant's requests in turn, each
        request's rows shortest first), up to max_batch rows and max_batch_tokens padded tokens.
        The tenant that went first goes last next time."""
        self._drop_abandoned()
        batch: list[tuple[_Pending, int]] = []
        longest = 0
        first = next(iter(self._tenants), None)
        now = time.perf_counter()
        while self._tenants and len(batch) < self.max_batch:
            full = False
            for tenant in list(self._tenants):
                q = self._tenants[tenant]
                p = q[0]
                i = p.order[p.next]
                length = len(p.ids[i])
                if batch and (len(batch) + 1) * max(longest, length) > self.max_batch_tokens:
                    full = True
                    break
                if p.next == 0:
                    self.stats.queue_seconds += now - p.enqueued
                    if self.metrics is not None:
                        self.metrics.queue_seconds.observe(now - p.enqueued)
                batch.append((p, i))
                longest = max(longest, length)
                p.next += 1
                self._queued_rows -= 1
                self._queued_tokens -= length
                self._tenant_tokens[tenant] -= length
                if p.waiting_rows == 0:
                    q.popleft()
                    if not q:
                        del self._tenants[tenant]
                        self._tenant_tokens.pop(tenant, None)
                else:
                    q.rotate(-1)
                if len(batch) >= self.max_batch:
                    break
            if full:
                break
        if first is not None and first in self._tenants:
            self._tenants.move_to_end(first)
        self._gauge()
        return batch

    async def _execute(self, batch: list[tuple[_Pending, int]]) -> None:
        started = time.perf_counter()
        residents = [p.resident for p, _ in batch]
        ids = [p.ids[i] for p, i in batch]
        requests = list(dict.fromkeys(p for p, _ in batch))
        adapters = len({id(r) for r in residents})
        with tracer.start_as_current_span(
            "loradock.batch",
            links=[trace.Link(p.trace_context) for p in requests],
            attributes={"loradock.rows": len(batch), "loradock.adapters": adapters},
        ):
            try:
                out = await asyncio.to_thread(self.engine.run_encoded, residents, ids)
            except Exception as e:
                await self._isolate(batch, e)
            else:
                for (p, i), r in zip(batch, out, strict=True):
                    self._answer(p, i, r)
        seconds = time.perf_counter() - started
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch of %d rows for %d requests and %d adapters in %.1f ms",
                len(batch), len(requests), adapters, seconds * 1000,
                extra={"rows": len(batch), "adapters": adapters,
                       "request_ids": [p.request_id for p in requests],
                       "duration_ms": round(seconds * 1000, 2)},
            )  # fmt: skip
        if self.metrics is not None:
            self.metrics.inference_seconds.observe(seconds)
            self.metrics.batch_rows.observe(len(batch))
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        self._observe_throughput(sum(len(row) for row in ids), seconds)

    async def _isolate(self, batch: list[tuple[_Pending, int]], error: Exception) -> None:
        """A pass raised: rerun each request's rows alone, so only the culprit fails."""
        requests: dict[_Pending, list[int]] = {}
        for p, i in batch:
            requests.setdefault(p, []).append(i)
        if len(requests) == 1:
            (p,) = requests
            self._fail(p, error)
            return
        self.stats.isolated_failures += 1
        log.warning("a batch of %d requests failed (%s): retrying them one by one",
                    len(requests), error)  # fmt: skip
        for p, rows in requests.items():
            if p.future.done():
                continue
            try:
                out = await asyncio.to_thread(
                    self.engine.run_encoded, [p.resident] * len(rows), [p.ids[i] for i in rows]
                )
            except Exception as e:
                self._fail(p, e)
                continue
            for i, r in zip(rows, out, strict=True):
                self._answer(p, i, r)

    def _answer(self, p: _Pending, i: int, r: RowResult) -> None:
        p.results[i] = r
        p.answered += 1
        if p.answered == len(p.ids) and not p.future.done():
            p.future.set_result([r for r in p.results if r is not None])

    def _fail(self, p: _Pending, error: Exception) -> None:
        if not p.future.done():
            log.error("predict request failed in the engine: %s", error)
            p.future.set_exception(error)
        # Its rows still queued are dropped by _drop_abandoned (the future is done).

    def _observe_throughput(self, tokens: int, seconds: float, decay: float = 0.8) -> None:
        self._recent_tokens = self._recent_tokens * decay + tokens
        self._recent_seconds = self._recent_seconds * decay + seconds
