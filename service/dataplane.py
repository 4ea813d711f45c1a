"""The data plane: everything between "a route parsed a request" and "the engine ran it".

Every predict-like route (/v1 predict, /v2 infer, feedback, and the routes still to come) calls
`DataPlane.predict`, which does, once for all of them: request metrics, the per-tenant rate
limit, input checks, resolving the live (or asked-for) version, the mixed-adapter batch through
the engine, truncation flags, and handing the answered rows to the drift monitor. Routes only
translate their protocol to and from it. One `AdapterRef` travels the whole path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from collections.abc import Sequence as Seq
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from loradock.adapters.artifacts.files import ArtifactError
from loradock.adapters.artifacts.store import ArtifactNotFound, StoreError
from loradock.adapters.core.text import encoding_problem
from loradock.adapters.serving.decode import (
    Admitted,
    EngineOverloaded,
    Event,
    Failed,
    Finished,
    GenerationEngine,
    RequestTooLarge,
    Sequence,
    Token,
    TokenLogprob,
)
from loradock.adapters.serving.engine import BatchTooLarge, Engine, RowResult
from loradock.adapters.serving.generation import PromptTooLong, SamplingParams
from loradock.adapters.serving.slots import AdapterRef, CapacityError, IncompatibleAdapter
from loradock.adapters.tasks.base import Task
from loradock.service.batcher import MicroBatcher
from loradock.service.db.registry import Database
from loradock.service.errors import (
    BadRequest,
    Conflict,
    LoradockError,
    NotFound,
    NotReady,
    TooManyRequests,
    Unprocessable,
)
from loradock.service.lookup import find_adapter, find_version
from loradock.service.metrics import Metrics
from loradock.service.monitor import Monitor
from loradock.service.ratelimit import TenantRateLimiter
from loradock.service.settings import Settings

log = logging.getLogger(__name__)


class AdapterUnavailable(LoradockError):
    status, slug, title = 503, "adapter-unavailable", "Adapter unavailable"


class AdapterMissing(NotFound):
    """The adapter itself is not in the registry (not merely one of its versions)."""


@dataclass(frozen=True)
class Answer:
    """One request's answer: the version that answered, its task, a prediction per input (in
    input order; `truncated: true` where the text was cut at the model's token limit) and the
    per-row results the monitor sees."""

    ref: AdapterRef
    task: Task
    predictions: list[dict[str, Any]]
    rows: list[RowResult]


class LiveVersions:
    """Resolves `{adapter}` (+ optional version) to an AdapterRef, caching the live version.

    A promotion or delete in this process invalidates the entry at once, so a response after a
    promote's acknowledgement always comes from the new version. Other replicas' changes are seen
    within `ttl` seconds (the entries expire and the registry is read again). When that read finds
    a cached adapter gone (deleted on another replica, perhaps re-created under the same name),
    `on_gone(adapter_id)` frees what this process still holds of it (its slots, its window).
    """

    def __init__(
        self, db: Database, ttl: float = 1.0, on_gone: Callable[[str], None] | None = None
    ) -> None:
        self.db = db
        self.ttl = ttl
        self.on_gone = on_gone
        self._cache: dict[tuple[str, str], tuple[float, AdapterRef]] = {}
        self._lock = threading.Lock()
        # Bumped by every invalidation. A lookup that read the registry while an invalidation
        # happened must not cache what it read: it may be the version just replaced.
        self._generation = 0

    def invalidate(self, adapter_id: str) -> None:
        with self._lock:
            self._generation += 1
            for key in [k for k, (_, t) in self._cache.items() if t.adapter_id == adapter_id]:
                del self._cache[key]

    def resolve(self, tenant_id: str, ref: str, version: int | None) -> AdapterRef:
        with self._lock:
            hit = self._cache.get((tenant_id, ref))
            generation = self._generation
        if version is None and hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        try:
            target = self._read(tenant_id, ref, version)
        except AdapterMissing:
            if hit is not None:
                self._gone(hit[1].adapter_id)
            raise
        if hit is not None and hit[1].adapter_id != target.adapter_id:
            self._gone(hit[1].adapter_id)
        if version is None:
            with self._lock:
                if self._generation == generation:
                    self._cache[(tenant_id, ref)] = (time.monotonic(), target)
        return target

    def _gone(self, adapter_id: str) -> None:
        """A cached adapter no longer exists in the registry: drop it here too."""
        self.invalidate(adapter_id)
        if self.on_gone is not None:
            log.info("adapter %s was deleted elsewhere: freeing it here", adapter_id)
            self.on_gone(adapter_id)

    def _read(self, tenant_id: str, ref: str, version: int | None) -> AdapterRef:
        with self.db.session() as s:
            try:
                adapter = find_adapter(s, tenant_id, ref)
            except NotFound as e:
                raise AdapterMissing(e.detail) from None
            number = version if version is not None else adapter.live_version
            if number is None:
                if adapter.status == "training":
                    raise Conflict(
                        f"adapter {adapter.name!r} is still training: no live version yet"
                    )
                raise Conflict(
                    f"adapter {adapter.name!r} has no live version (status {adapter.status})"
                )
            ver = find_version(s, adapter, number)
            if ver.status != "ready" or not ver.artifact_key:
                raise Conflict(f"version {number} of {adapter.name!r} is {ver.status}, not ready")
            return AdapterRef(
                adapter.id, number, name=adapter.name, key=ver.artifact_key, task=adapter.task
            )


@dataclass
class Choice:
    """One finished generation of a request, as a non-streaming answer returns it."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenLogprob]


class GenerationFailed(LoradockError):
    status, slug, title = 503, "generation-failed", "Generation failed"


def _once_after(n: int, action: Callable[[], None]) -> Callable[[], None]:
    """A callable that runs `action` on its n-th call (from any thread)."""
    lock = threading.Lock()
    left = [n]

    def done() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            action()

    return done


class GenerationStream:
    """A request's `n` generations in the engine: their events in order, on the event loop."""

    def __init__(self, ref: AdapterRef | None, prompt_tokens: int) -> None:
        self.ref = ref
        self.prompt_tokens = prompt_tokens
        self.seqs: list[Sequence] = []
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._early: list[tuple[int, Event]] = []  # events read while waiting for admission
        self._ended = 0

    def deliver(self, loop: asyncio.AbstractEventLoop, index: int, event: Event) -> None:
        """The engine's sink (engine thread): hand the event to the request's loop."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    async def admitted(self) -> None:
        """Wait until every generation has a place in the batch; a queue timeout is a 429."""
        waiting = len(self.seqs)
        while waiting:
            index, event = await self._queue.get()
            if isinstance(event, Admitted):
                waiting -= 1
                continue
            self._early.append((index, event))
            if isinstance(event, Failed):
                self._raise(event)
        log.debug(
            "%d generations admitted into the decode batch",
            len(self.seqs),
            extra={"choices": len(self.seqs), "prompt_tokens": self.prompt_tokens},
        )

    @staticmethod
    def _raise(event: Failed) -> None:
        if event.kind == "overloaded":
            raise TooManyRequests(event.message, retry_after=2)
        if event.kind == "shutdown":
            raise NotReady(event.message)
        raise GenerationFailed(event.message)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, Token | Finished | Failed) until every choice has ended."""
        while self._ended < len(self.seqs):
            if self._early:
                index, event = self._early.pop(0)
            else:
                index, event = await self._queue.get()
            if isinstance(event, Admitted):
                continue
            if isinstance(event, Finished | Failed):
                self._ended += 1
            yield index, event

    async def collect(self) -> list[Choice]:
        """Every choice's whole answer (a failed generation raises)."""
        texts: list[list[str]] = [[] for _ in self.seqs]
        logprobs: list[list[TokenLogprob]] = [[] for _ in self.seqs]
        done: list[Finished | None] = [None] * len(self.seqs)
        async for index, event in self.events():
            if isinstance(event, Token):
                texts[index].append(event.text)
                if event.logprob is not None:
                    logprobs[index].append(event.logprob)
            elif isinstance(event, Finished):
                done[index] = event
            else:
                self.cancel()
                self._raise(event)
        return [
            Choice(f.text, f.finish_reason, f.completion_tokens, logprobs[i])
            for i, f in enumerate(done)
            if f is not None
        ]


class DataPlane:
    """The engine, the batcher and the live-version cache behind every predict-like route."""

    def __init__(
        self,
        engine: Engine,
        batcher: MicroBatcher,
        live: LiveVersions,
        settings: Settings,
        *,
        monitor: Monitor | None = None,
        metrics: Metrics | None = None,
        rate_limiter: TenantRateLimiter | None = None,
        generator: GenerationEngine | None = None,
    ) -> None:
        self.engine = engine
        self.generator = generator  # the decode engine, on a causal-LM base
        self.batcher = batcher
        self.live = live
        self.settings = settings
        self.monitor = monitor
        self.metrics = metrics or Metrics()
        self.rate_limiter = rate_limiter or TenantRateLimiter(0.0, 1.0)
        if live.on_gone is None:  # deletes on other replicas free this process's copy too
            live.on_gone = self.forget

    def forget(self, adapter_id: str) -> None:
        """Drop a deleted adapter's slots (after in-flight use) and its monitoring window."""
        self.live.invalidate(adapter_id)
        self.engine.pool.drop(adapter_id)
        if self.monitor is not None:
            self.monitor.forget(adapter_id)

    # --- the one path --------------------------------------------------------------------------

    async def predict(
        self,
        tenant_id: str,
        adapter: str,
        version: int | None,
        texts: Seq[str],
        *,
        protocol: str,
        observe: bool = True,
        check: Callable[[Task], None] | None = None,
    ) -> Answer:
        """Texts through the caller's adapter (its live version unless `version` is given).

        `protocol` labels the request metrics (v1, v2, feedback); `observe=False` keeps the rows
        out of drift monitoring (feedback texts are not traffic); `check` may refuse the request
        once the version's task is known, before any compute."""
        texts = list(texts)
        with self.metrics_for(protocol, len(texts)):
            ids = await self._admit(tenant_id, texts)
            ref = await asyncio.to_thread(self.live.resolve, tenant_id, adapter, version)
            resident = await self._acquire(ref)
            try:
                task: Task = resident.state.task
                if not task.has_head:
                    raise Unprocessable(
                        f"{ref.name!r} is a {task.name} adapter: it answers through POST "
                        "/v1/chat/completions and /v1/completions, not predictions"
                    )
                if check is not None:
                    check(task)
                rows = await self._run(resident, ids, tenant_id)
            finally:
                self.engine.release([resident])
        if observe and self.monitor is not None:
            self.monitor.observe(ref, rows, live=version is None)
        predictions = [r.prediction(self.engine.base.max_length) for r in rows]
        return Answer(ref=ref, task=task, predictions=predictions, rows=rows)

    async def embed(
        self, tenant_id: str, adapter: str | None, texts: Seq[str]
    ) -> tuple[AdapterRef | None, list[RowResult]]:
        """Pooled embeddings of texts from the frozen base (`adapter` None) or from an adapter's
        live version (its LoRA-adapted encoder), through the same batcher, limits and metrics as
        predict. Embedding traffic is not prediction traffic: it is kept out of drift windows."""
        if adapter is not None:
            answer = await self.predict(
                tenant_id, adapter, None, texts, protocol="embeddings", observe=False
            )
            return answer.ref, answer.rows
        texts = list(texts)
        with self.metrics_for("embeddings", len(texts)):
            ids = await self._admit(tenant_id, texts)
            rows = await self._run(self.engine.base_resident(), ids, tenant_id)
        return None, rows

    async def start_generation(
        self,
        tenant_id: str,
        adapter: str | None,
        prompt: Callable[[Any], list[int]],
        params: SamplingParams,
        *,
        n: int = 1,
        protocol: str,
        prompt_field: str = "prompt",
    ) -> GenerationStream:
        """`n` generations from the base (`adapter` None) or an adapter's live version, for the
        prompt `prompt(base)` builds, in the continuous-batching engine; returns once all `n`
        have a place in the decode batch (their events then stream from the result).

        The version is resolved and its slot held once, for all `n`, until the last one ends:
        a promotion meanwhile lets these finish on the version they started with. A request
        that waited longer than LORADOCK_GENERATION_QUEUE_SECONDS, or finds the queue full, gets
        429; one that cannot fit the context or the KV budget, 400."""
        generator = self.generator
        if generator is None:
            raise Unprocessable("this server's base is not a causal LM: it does not generate")
        with self.metrics_for(protocol, n):
            self.rate_limiter.take(tenant_id)
            ids = await asyncio.to_thread(prompt, self.engine.base)
            ref = resident = None
            if adapter is not None:
                ref = await asyncio.to_thread(self.live.resolve, tenant_id, adapter, None)
                resident = await self._acquire(ref)
            stream = GenerationStream(ref, len(ids))
            handed_over = False
            try:
                if resident is not None and resident.state.task.has_head:
                    raise Unprocessable(
                        f"{ref.name if ref else adapter!r} is a {resident.state.task.name} "
                        "adapter, not a generation adapter: use its predict route"
                    )
                held = [resident] if resident is not None else []
                release = _once_after(n, lambda: self.engine.release(held))
                loop = asyncio.get_running_loop()
                sink = stream.deliver
                if ref is not None and self.monitor is not None:
                    sink = functools.partial(self._observed, ref, stream.deliver)
                stream.seqs = [
                    Sequence(
                        ids,
                        replace(params, seed=params.seed + i if params.seed is not None else None),
                        slot=resident.slot if resident is not None else 0,
                        sink=functools.partial(sink, loop, i),
                        on_done=release,
                        tag=i,
                    )
                    for i in range(n)
                ]
                try:
                    for seq in stream.seqs:
                        generator.prepare(seq)
                except (PromptTooLong, RequestTooLarge) as e:
                    raise BadRequest(
                        str(e), extra={"param": prompt_field, "code": "context_length_exceeded"}
                    ) from e
                try:
                    generator.submit(stream.seqs)
                except EngineOverloaded as e:
                    raise TooManyRequests(f"{e}; retry shortly", retry_after=1) from e
                except RuntimeError as e:
                    raise NotReady(str(e)) from e
                handed_over = True  # from here the engine releases the slot when they end
            finally:
                if not handed_over and resident is not None:
                    self.engine.release([resident])
            try:
                await stream.admitted()
            except BaseException:
                stream.cancel()
                raise
        return stream

    def _observed(self, ref: AdapterRef, deliver: Callable[..., None],
                  loop: asyncio.AbstractEventLoop, index: int, event: Event) -> None:  # fmt: skip
        """The engine's sink for an adapter's generations: a finished one also goes to drift
        monitoring (its prompt embedding and length, its answer's length), then to the stream.
        The embedding was copied to the host during prefill; every decode step since read the
        sampled ids back, which waits for that copy too."""
        if isinstance(event, Finished) and event.prompt_embedding is not None:
            assert self.monitor is not None
            row = RowResult(output={"completion_tokens": event.completion_tokens},
                            pooled=event.prompt_embedding, tokens=event.prompt_tokens)  # fmt: skip
            self.monitor.observe(ref, [row], live=True)
        deliver(loop, index, event)

    async def task_of(self, tenant_id: str, adapter: str, version: int | None) -> Answer:
        """The resolved version and its task, without predicting (model metadata routes)."""
        ref = await asyncio.to_thread(self.live.resolve, tenant_id, adapter, version)
        resident = await self._acquire(ref)
        self.engine.release([resident])
        return Answer(ref=ref, task=resident.state.task, predictions=[], rows=[])

    async def _admit(self, tenant_id: str, texts: Seq[str]) -> list[list[int]]:
        """Rate limit, input checks, tokenizing once, the token limit: every text's way in."""
        self.rate_limiter.take(tenant_id)
        self.check_inputs(texts)
        ids = await asyncio.to_thread(self.engine.base.encode, texts)
        self.check_tokens(ids)
        return ids

    def check_inputs(self, texts: Seq[str]) -> None:
        s = self.settings
        if not texts:
            raise Unprocessable("inputs is empty")
        if len(texts) > s.max_texts_per_request:
            raise Unprocessable(
                f"{len(texts)} inputs exceed the limit of {s.max_texts_per_request} per request "
                "(setting LORADOCK_MAX_TEXTS_PER_REQUEST)"
            )
        for i, text in enumerate(texts):
            if not text.strip():
                raise Unprocessable(f"inputs[{i}] is empty")
            if len(text) > s.max_text_chars:
                raise Unprocessable(
                    f"inputs[{i}] has {len(text)} characters, the limit is {s.max_text_chars} "
                    "(setting LORADOCK_MAX_TEXT_CHARS)"
                )
            problem = encoding_problem(text)
            if problem is not None:
                raise Unprocessable(f"inputs[{i}]: {problem}")

    def check_tokens(self, ids: Seq[Seq[int]]) -> None:
        tokens = sum(len(row) for row in ids)
        limit = self.settings.max_request_tokens
        if tokens > limit:
            raise Unprocessable(
                f"the inputs come to {tokens} tokens (each text cut at "
                f"{self.engine.base.max_length}), the limit is {limit} per request (setting "
                "LORADOCK_MAX_REQUEST_TOKENS); split the request"
            )

    @contextmanager
    def metrics_for(self, protocol: str, rows: int) -> Iterator[None]:
        """Count and time one predict request; failures by a bounded reason."""
        m = self.metrics
        started = time.perf_counter()
        try:
            yield
        except LoradockError as e:
            m.predict_failures.labels(protocol, m.failure_reason(e.status)).inc()
            raise
        except Exception:
            m.predict_failures.labels(protocol, "internal").inc()
            raise
        m.predict_requests.labels(protocol).inc()
        m.predict_rows.inc(rows)
        m.predict_seconds.labels(protocol).observe(time.perf_counter() - started)

    # --- mechanics -----------------------------------------------------------------------------

    def _load_failed(self, reason: str) -> None:
        self.metrics.adapter_load_failures.labels(reason).inc()

    async def _acquire(self, ref: AdapterRef) -> Any:
        try:
            return await asyncio.to_thread(self.engine.acquire, ref)
        except IncompatibleAdapter as e:
            self._load_failed("incompatible")
            raise Conflict(f"version {ref.version} of {ref.name!r} cannot be served: {e}") from e
        except CapacityError as e:
            self._load_failed("capacity")
            raise AdapterUnavailable(str(e), headers={"Retry-After": "1"}) from e
        except (StoreError, ArtifactError, ValueError, KeyError, OSError) as e:
            # One broken version fails its own requests only; nothing is cached, so a repaired
            # store (or a promote to another version) serves again without a restart.
            reason = (
                "missing"
                if isinstance(e, ArtifactNotFound)
                else "corrupt"
                if isinstance(e, StoreError)
                else "incompatible"
            )
            self._load_failed(reason)
            log.error("adapter %s v%d cannot be loaded (%s): %s", ref.adapter_id, ref.version,
                      reason, e)  # fmt: skip
            raise AdapterUnavailable(
                f"version {ref.version} of {ref.name!r} cannot be loaded ({reason}): {e}; "
                "promote another version or retrain it"
            ) from e

    async def _run(self, resident: Any, ids: list[list[int]], tenant_id: str) -> list[RowResult]:
        try:
            return await self.batcher.submit(resident, ids, tenant_id)
        except BatchTooLarge as e:
            raise AdapterUnavailable(str(e)) from e
