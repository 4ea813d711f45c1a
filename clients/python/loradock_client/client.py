"""The synchronous client: `Client(url, api_key)` with resources adapters, versions, jobs, ..."""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from loradock_client import _calls
from loradock_client._calls import FeedbackItems, PathArg, Rows, seg, write_file
from loradock_client._transport import (
    DEFAULT_TIMEOUT,
    Call,
    RetryEvent,
    RetryHook,
    RetryPolicy,
    connection_failed,
    decode_sse,
    default_headers,
    describe_error,
    log_retry,
    make_timeout,
    resolve_api_key,
    resolve_url,
    retry_delay,
    stream_timeout,
)
from loradock_client.batching import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    ProgressHook,
    predict_all,
    predict_chunks,
)
from loradock_client.errors import JobFailed, StreamInterrupted
from loradock_client.models import (
    Adapter,
    BatchSubmission,
    FeedbackResult,
    Identity,
    Job,
    JobEvent,
    Key,
    MonitoringReport,
    OnConflict,
    Prediction,
    PredictionResult,
    Promote,
    Task,
    Tenant,
    TrainingResult,
    Version,
)
from loradock_client.progress import EventHook, JobWatch, ProgressDisplay, make_display
from loradock_client.watching import finish_training, reconnect_delay, watch_result

T = TypeVar("T")


class Client:
    """A connection to one loradock server.

    `url` defaults to $LORADOCK_URL, then http://127.0.0.1:8000; `api_key` to $LORADOCK_API_KEY.
    `timeout` (seconds or an httpx.Timeout) applies to every request except event streams, which
    have no read timeout. Failed requests are retried as `retry` says (see RetryPolicy); every
    retry is logged on the `loradock_client` logger and passed to `on_retry`. Errors are raised
    as the typed exceptions of `loradock_client.errors`. Use as a context manager, or `close()`.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        on_retry: RetryHook | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = resolve_url(url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = make_timeout(timeout)
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._http = httpx.Client(
            base_url=self.url,
            headers={**default_headers(self.api_key), **(headers or {})},
            timeout=self.timeout,
            transport=transport,
        )
        self.adapters = Adapters(self)
        self.versions = Versions(self)
        self.jobs = Jobs(self)
        self.tenants = Tenants(self)
        self.keys = Keys(self)

    def predict(
        self,
        adapter: str,
        texts: str | Sequence[str],
        version: int | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_progress: ProgressHook | None = None,
    ) -> PredictionResult:
        """Same as `adapters.predict`."""
        return self.adapters.predict(
            adapter, texts, version=version, batch_size=batch_size, concurrency=concurrency,
            on_progress=on_progress,
        )  # fmt: skip

    def health(self) -> bool:
        """True when the server process answers /healthz (no retries)."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> bool:
        """True when /readyz says the base model is loaded and the server serves (no retries)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- sending ---------------------------------------------------------------------------------

    def _call(self, call: Call[T]) -> T:
        response = self._send(call)
        try:
            return call.parse(response)
        finally:
            response.close()

    def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """Send with retries; a success comes back (unread when `stream`), an error is raised."""
        timeout = stream_timeout(self.timeout) if stream else self.timeout
        attempt = 0
        while True:
            attempt += 1
            request = self._http.build_request(
                call.method, call.path, timeout=timeout, **call.request_kwargs()
            )
            url = str(request.url)
            try:
                response = self._http.send(request, stream=stream)
                if not response.is_success and stream:
                    response.read()
                    response.close()
            except httpx.TransportError as exc:
                delay = self.retry.delay_after_error(call.retry_method, exc, attempt)
                if delay is None:
                    raise connection_failed(call.method, url, exc, attempt) from exc
                self._pause(RetryEvent(call.method, url, attempt, delay, describe_error(exc)))
                continue
            if response.is_success:
                return response
            delay, error = retry_delay(self.retry, call.retry_method, response, attempt)
            if delay is None:
                raise error
            reason = f"{response.status_code} {response.reason_phrase}"
            self._pause(RetryEvent(call.method, url, attempt, delay, reason, response.status_code))

    def _pause(self, event: RetryEvent) -> None:
        log_retry(event, self.on_retry)
        time.sleep(event.delay)


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client


class Adapters(_Resource):
    """Adapters: train (create, retrain), read, predict, feedback, monitoring, move, delete."""

    def create(
        self,
        name: str,
        task: Task | None = None,
        *,
        training_data: Rows | None = None,
        training_file: PathArg | None = None,
        validation_data: Rows | None = None,
        validation_file: PathArg | None = None,
        validation_split: float | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        promote: Promote = "if_better",
        on_conflict: OnConflict = "drop",
        wait: bool = True,
        progress: bool | ProgressDisplay | None = None,
        on_event: EventHook | None = None,
    ) -> TrainingResult:
        """Create an adapter and train its version 1 from rows (`{"text", "label", "group"?}`;
        generation: OpenAI chat or prompt/completion rows) or a JSONL/CSV file; `task` None is
        the server base's default (classification, or generation on a causal LM). With
        `wait`, follow the job (a progress bar on stderr when it is a
        terminal, or as `progress` says) and return the trained adapter; a failed or cancelled
        job raises TrainingFailed. Without, return at once with the queued job. A text given
        different labels is dropped with a warning (`on_conflict="drop"`) or refuses the data
        (`"reject"`, ValidationFailed naming the row)."""
        call = _calls.training_call(
            "/v1/adapters",
            training_data=training_data,
            training_file=training_file,
            validation_data=validation_data,
            validation_file=validation_file,
            validation_split=validation_split,
            hyperparameters=hyperparameters,
            promote=promote,
            fields={"name": name, "on_conflict": on_conflict, **({"task": task} if task else {})},
        )
        return self._finish(self._client._call(call), wait, progress, on_event)

    def retrain(
        self,
        adapter: str,
        *,
        training_data: Rows | None = None,
        training_file: PathArg | None = None,
        validation_data: Rows | None = None,
        validation_file: PathArg | None = None,
        validation_split: float | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        promote: Promote = "if_better",
        on_conflict: OnConflict = "drop",
        wait: bool = True,
        progress: bool | ProgressDisplay | None = None,
        on_event: EventHook | None = None,
    ) -> TrainingResult:
        """Train the next version of `adapter` (id or name); like `create` otherwise."""
        call = _calls.training_call(
            f"/v1/adapters/{seg(adapter)}/versions",
            training_data=training_data,
            training_file=training_file,
            validation_data=validation_data,
            validation_file=validation_file,
            validation_split=validation_split,
            hyperparameters=hyperparameters,
            promote=promote,
            fields={"on_conflict": on_conflict},
        )
        return self._finish(self._client._call(call), wait, progress, on_event)

    def _finish(
        self,
        started: TrainingResult,
        wait: bool,
        progress: bool | ProgressDisplay | None,
        on_event: EventHook | None,
    ) -> TrainingResult:
        if not wait:
            return started
        job = self._client.jobs.watch(started.job.id, progress=progress, on_event=on_event)
        return finish_training(self.get(started.adapter.id), job)

    def list(self, *, view: str = "full") -> builtins.list[Adapter]:
        """Every adapter, oldest first (all pages). `view="summary"` leaves out the versions'
        histories and reports (`version_count`, `latest_version`, `live_metrics` instead)."""
        return builtins.list(self.iter(view=view))

    def iter(self, *, view: str = "full", page_size: int = _calls.PAGE_SIZE) -> Iterator[Adapter]:
        """Adapters a page at a time, as they are needed."""
        cursor: str | None = None
        while True:
            items, cursor = self._client._call(_calls.list_adapters(cursor, page_size, view))
            yield from items
            if cursor is None:
                return

    def get(self, adapter: str) -> Adapter:
        return self._client._call(_calls.get_adapter(adapter))

    def delete(self, adapter: str) -> None:
        self._client._call(_calls.delete_adapter(adapter))

    def predict(
        self,
        adapter: str,
        texts: str | Sequence[str],
        version: int | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_progress: ProgressHook | None = None,
    ) -> PredictionResult:
        """Predict with the live version (or `version`); predictions come in input order.

        Any number of texts: more than `batch_size` go out as requests of `batch_size`, up to
        `concurrency` in flight, all served by the version that answered the first one (see
        `loradock_client.batching`); `on_progress` hears each answered request."""
        if isinstance(texts, str) or len(texts) <= batch_size:
            return self._client._call(_calls.predict(adapter, texts, version))
        return predict_all(
            self._client, adapter, texts, version=version, batch_size=batch_size,
            concurrency=concurrency, on_progress=on_progress,
        )  # fmt: skip

    def predict_iter(
        self,
        adapter: str,
        texts: Iterable[str],
        version: int | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        total: int | None = None,
        on_progress: ProgressHook | None = None,
    ) -> Iterator[tuple[str, Prediction, int]]:
        """(text, prediction, version) for every text of a possibly lazy iterable (a file of
        100k lines), in input order, as the answers arrive; memory stays bounded by
        `batch_size * concurrency`."""
        for chunk, result in predict_chunks(
            self._client, adapter, texts, version=version, batch_size=batch_size,
            concurrency=concurrency, total=total, on_progress=on_progress,
        ):  # fmt: skip
            for text, prediction in zip(chunk, result.predictions, strict=True):
                yield text, prediction, result.version

    def batch(
        self,
        adapter: str,
        texts: Sequence[Any] | None = None,
        *,
        file: PathArg | None = None,
        version: int | None = None,
    ) -> BatchSubmission:
        """Queue a server-side batch prediction job over `texts` (strings, or dicts with `text`
        and an optional `id` echoed in the results) or a `file` (JSONL, CSV with a text column,
        or .txt), on `version` (default: the live one, pinned now). Follow it with
        `jobs.get`/`jobs.wait_results`; rows that cannot be predicted are listed as errors."""
        return self._client._call(_calls.batch(adapter, texts, file, version))

    def feedback(self, adapter: str, items: FeedbackItems) -> FeedbackResult:
        """True labels for texts (dicts `{"text","label"}` or `(text, label)` pairs)."""
        return self._client._call(_calls.feedback(adapter, items))

    def monitoring(self, adapter: str) -> MonitoringReport:
        return self._client._call(_calls.monitoring(adapter))

    def download(
        self, adapter: str, version: int | None = None, path: PathArg | None = None
    ) -> Path:
        """Save a version's zip (default: the live one) to `path`: a file, or a directory where
        it takes the server's filename (default: the current directory). Returns the file."""
        response = self._client._call(_calls.download(adapter, version))
        target = _calls.download_target(response, adapter, version, path)
        write_file(target, response.content)
        return target

    def export(
        self,
        adapter: str,
        version: int | None = None,
        path: PathArg | None = None,
        *,
        format: str = "peft",
    ) -> Path:
        """Save a version as a zip other tools load: `format="peft"` (the LoRA adapter folder
        with its head and model card; head-only for a probe) or `"sentence-transformers"` (a
        full model, LoRA merged, the head as its last module). `path` as in `download`."""
        response = self._client._call(_calls.export(adapter, version, format))
        target = _calls.download_target(response, adapter, version, path)
        write_file(target, response.content)
        return target

    def import_(self, path: PathArg, name: str | None = None) -> Adapter:
        """Upload an adapter zip (as `download` writes it); `name` renames it, when given."""
        return self._client._call(_calls.import_adapter(path, name))


class Versions(_Resource):
    def get(self, adapter: str, version: int) -> Version:
        return self._client._call(_calls.get_version(adapter, version))

    def list(self, adapter: str) -> builtins.list[Version]:
        return self._client.adapters.get(adapter).versions

    def promote(self, adapter: str, version: int) -> Adapter:
        """Make a ready version live (also how to roll back); returns the adapter."""
        return self._client._call(_calls.promote_version(adapter, version))


class Jobs(_Resource):
    def get(self, job_id: str) -> Job:
        return self._client._call(_calls.get_job(job_id))

    def list(self, adapter: str | None = None, *, view: str = "full") -> builtins.list[Job]:
        """Every job (of one adapter when given), newest first (all pages); `view="summary"`
        leaves out the per-epoch histories."""
        return builtins.list(self.iter(adapter, view=view))

    def iter(
        self, adapter: str | None = None, *, view: str = "full", page_size: int = _calls.PAGE_SIZE
    ) -> Iterator[Job]:
        """Jobs a page at a time, as they are needed."""
        cursor: str | None = None
        while True:
            items, cursor = self._client._call(_calls.list_jobs(adapter, cursor, page_size, view))
            yield from items
            if cursor is None:
                return

    def cancel(self, job_id: str) -> Job:
        return self._client._call(_calls.cancel_job(job_id))

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[JobEvent]:
        """The job's server-sent events of one connection, until `end` (or the stream closes);
        with `last_event_id`, only what came after that event."""
        response = self._client._send(_calls.job_events(job_id, last_event_id), stream=True)
        try:
            yield from decode_sse(response.iter_lines())
        except httpx.TransportError as exc:
            raise StreamInterrupted(
                f"event stream of job {job_id} broke: {describe_error(exc)}"
            ) from exc
        finally:
            response.close()

    def watch(
        self,
        job_id: str,
        *,
        progress: bool | ProgressDisplay | None = None,
        on_event: EventHook | None = None,
    ) -> Job:
        """Follow a job until it ends and return it. Reconnects when the stream breaks (epochs
        are passed to `on_event` once); shows a progress bar as `progress` says (default: when
        stderr is a terminal). The job's own failure is in the returned job's status."""
        display = make_display(progress)
        state = JobWatch(job_id, [display, *([on_event] if on_event else [])])
        breaks = 0  # streams in a row that ended early without news
        try:
            while not state.ended:
                news, error = False, None
                state.new_connection()
                try:
                    for event in self.events(job_id, state.last_event_id):
                        news = state.accept(event) or news
                        if state.ended:
                            break
                except StreamInterrupted as exc:
                    error = exc
                if state.ended:
                    break
                breaks = 1 if news else breaks + 1
                delay = reconnect_delay(self._client.retry, job_id, breaks, error)
                reason = str(error) if error else "stream closed before the job ended"
                self._client._pause(
                    RetryEvent("GET", f"/v1/jobs/{job_id}/events", breaks, delay, reason)
                )
        finally:
            display.close()
        return watch_result(state)

    def results(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """A finished prediction job's results: a dict per input row, in input order, with
        `row` (1-based), `id` when the input had one, and `prediction` or `error`."""
        response = self._client._call(_calls.job_results(job_id))
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    def wait_results(
        self,
        job_id: str,
        *,
        poll_seconds: float = 1.0,
        on_progress: Callable[[Job], None] | None = None,
    ) -> builtins.list[dict[str, Any]]:
        """Poll a prediction job until it ends, then return its results (TrainingFailed-like
        JobFailed when it failed or was cancelled)."""
        while True:
            job = self.get(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.done:
                break
            time.sleep(poll_seconds)
        if job.status != "succeeded":
            raise JobFailed(job)
        return self.results(job_id)


class Tenants(_Resource):
    def create(self, name: str) -> Tenant:
        return self._client._call(_calls.create_tenant(name))

    def list(self) -> builtins.list[Tenant]:
        return self._client._call(_calls.list_tenants())

    def delete(self, tenant_id: str) -> None:
        """The tenant and everything it owns (keys, adapters, jobs, artifacts)."""
        self._client._call(_calls.delete_tenant(tenant_id))


class Keys(_Resource):
    def create(self, tenant_id: str, scopes: Sequence[str] = ("train", "predict")) -> Key:
        """A new API key of the tenant; its secret `key` is in this answer only."""
        return self._client._call(_calls.create_key(tenant_id, scopes))

    def revoke(self, key_id: str) -> None:
        self._client._call(_calls.revoke_key(key_id))

    def rotate(self, key_id: str) -> Key:
        """A new key with the same tenant and scopes; the old one is revoked."""
        return self._client._call(_calls.rotate_key(key_id))

    def list(
        self, tenant_id: str | None = None, *, include_revoked: bool = False
    ) -> builtins.list[Key]:
        """Keys of a tenant (default the caller's), without secrets."""
        return self._client._call(_calls.list_keys(tenant_id, include_revoked))

    def whoami(self) -> Identity:
        """The calling key's tenant and scopes."""
        return self._client._call(_calls.whoami())
