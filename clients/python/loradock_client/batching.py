"""Predicting many texts: inputs split into requests, a few in flight, answers kept in order.

A server takes at most `LORADOCK_MAX_PREDICT_INPUTS` texts per request (256 by default) and batches
concurrent requests together, so a big input goes out as requests of `batch_size` texts with up to
`concurrency` of them in flight. The first request's answer names the version that served it; every
later request asks for that version, so a hot swap half-way through cannot mix two models in one
result. Each request is retried like any other call (predictions change nothing on the server).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

from loradock_client import _calls
from loradock_client.models import PredictionResult

if TYPE_CHECKING:
    from loradock_client.aio import AsyncClient
    from loradock_client.client import Client

DEFAULT_BATCH_SIZE = 64
DEFAULT_CONCURRENCY = 4


@dataclass(frozen=True)
class BatchProgress:
    """Where a batch prediction stands: texts answered so far, of `total` when known."""

    done: int
    total: int | None
    seconds: float

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


ProgressHook = Callable[[BatchProgress], None]


class _Tally:
    """Counts answered texts and tells `on_progress` after each answer."""

    def __init__(self, total: int | None, on_progress: ProgressHook | None) -> None:
        self.total, self.on_progress = total, on_progress
        self.done = 0
        self.started = time.perf_counter()

    def add(self, result: PredictionResult) -> PredictionResult:
        self.done += len(result.predictions)
        if self.on_progress is not None:
            elapsed = time.perf_counter() - self.started
            self.on_progress(BatchProgress(self.done, self.total, elapsed))
        return result


def _check(batch_size: int, concurrency: int) -> None:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")


def chunked(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while chunk := list(islice(it, size)):
        yield chunk


def predict_chunks(
    client: Client,
    adapter: str,
    texts: Iterable[str],
    *,
    version: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    total: int | None = None,
    on_progress: ProgressHook | None = None,
) -> Iterator[tuple[list[str], PredictionResult]]:
    """(texts, their result) per request, in input order; `texts` may be a lazy iterable."""
    _check(batch_size, concurrency)
    tally = _Tally(total, on_progress)
    chunks = chunked(texts, batch_size)
    first = next(chunks, None)
    if first is None:
        return
    result = tally.add(client._call(_calls.predict(adapter, first, version)))
    pinned = result.version
    yield first, result
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="loradock-predict")
    window: deque[tuple[list[str], Future[PredictionResult]]] = deque()
    try:
        for chunk in chunks:
            call = _calls.predict(adapter, chunk, pinned)
            window.append((chunk, pool.submit(client._call, call)))
            if len(window) >= concurrency:
                chunk, future = window.popleft()
                yield chunk, tally.add(future.result())
        while window:
            chunk, future = window.popleft()
            yield chunk, tally.add(future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def predict_all(
    client: Client,
    adapter: str,
    texts: Sequence[str],
    *,
    version: int | None,
    batch_size: int,
    concurrency: int,
    on_progress: ProgressHook | None = None,
) -> PredictionResult:
    """One PredictionResult for every text, however many."""
    predictions = []
    served = version
    for _, result in predict_chunks(
        client, adapter, texts, version=version, batch_size=batch_size,
        concurrency=concurrency, total=len(texts), on_progress=on_progress,
    ):  # fmt: skip
        predictions += result.predictions
        served = result.version
    return PredictionResult(adapter=adapter, version=served or 0, predictions=predictions)


async def apredict_all(
    client: AsyncClient,
    adapter: str,
    texts: Sequence[str],
    *,
    version: int | None,
    batch_size: int,
    concurrency: int,
    on_progress: ProgressHook | None = None,
) -> PredictionResult:
    """`predict_all` for the asyncio client: the first request pins the version, the rest run
    with at most `concurrency` in flight."""
    _check(batch_size, concurrency)
    tally = _Tally(len(texts), on_progress)
    chunks = list(chunked(texts, batch_size))
    if not chunks:
        return PredictionResult(adapter=adapter, version=version or 0, predictions=[])
    first = tally.add(await client._call(_calls.predict(adapter, chunks[0], version)))
    gate = asyncio.Semaphore(concurrency)

    async def one(chunk: list[str]) -> PredictionResult:
        async with gate:
            return tally.add(await client._call(_calls.predict(adapter, chunk, first.version)))

    rest = await asyncio.gather(*(one(c) for c in chunks[1:]))
    predictions = list(first.predictions)
    for r in rest:
        predictions += r.predictions
    return PredictionResult(adapter=adapter, version=first.version, predictions=predictions)
