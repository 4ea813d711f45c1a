"""The asyncio client: `AsyncClient` mirrors `Client` method for method, with `await`."""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import AsyncGenerator, Mapping, Sequence
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
    SSEDecoder,
    connection_failed,
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
    apredict_all,
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


class AsyncClient:
    """Like `Client` (same arguments, settings, retries and errors), for asyncio code:
    `async with AsyncClient() as client: await client.adapters.list()`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        on_retry: RetryHook | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = resolve_url(url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = make_timeout(timeout)
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={**default_headers(self.api_key), **(headers or {})},
            timeout=self.timeout,
            transport=transport,
        )
        self.adapters = AsyncAdapters(self)
        self.versions = AsyncVersions(self)
        self.jobs = AsyncJobs(self)
        self.tenants = AsyncTenants(self)
        self.keys = AsyncKeys(self)

    async def predict(
        self,
        adapter: str,
        texts: str | Sequence[str],
        version: int | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_progress: ProgressHook | None = None,
    ) -> PredictionResult:
        return await self.adapters.predict(
            adapter, texts, version=version, batch_size=batch_size, concurrency=concurrency,
            on_progress=on_progress,
        )  # fmt: skip

    async def health(self) -> bool:
        try:
            return (await self._http.get("/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- sending ---------------------------------------------------------------------------------

    async def _call(self, call: Call[T]) -> T:
        response = await self._send(call)
        try:
            return call.parse(response)
        finally:
            await response.aclose()

    async def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        timeout = stream_timeout(self.timeout) if stream else self.timeout
        attempt = 0
        while True:
            attempt += 1
            request = self._http.build_request(
                call.method, call.path, timeout=timeout, **call.request_kwargs()
            )
            url = str(request.url)
            try:
                response = await self._http.send(request, stream=stream)
                if not response.is_success and stream:
                    await response.aread()
                    await response.aclose()
            except httpx.TransportError as exc:
                delay = self.retry.delay_after_error(call.retry_method, exc, attempt)
                if delay is None:
                    raise connection_failed(call.method, url, exc, attempt) from exc
                await self._pause(RetryEvent(call.method, url, attempt, delay, describe_error(exc)))
                continue
            if response.is_success:
                return response
            delay, error = retry_delay(self.retry, call.retry_method, response, attempt)
            if delay is None:
                raise error
            reason = f"{response.status_code} {response.reason_phrase}"
            await self._pause(
                RetryEvent(call.method, url, attempt, delay, reason, response.status_code)
            )

    async def _pause(self, event: RetryEvent) -> None:
        log_retry(event, self.on_retry)
        await asyncio.sleep(event.delay)


class _AsyncResource:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client


class AsyncAdapters(_AsyncResource):
    async def create(
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
        """See `Client.adapters.create`."""
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
        return await self._finish(await self._client._call(call), wait, progress, on_event)

    async def retrain(
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
        return await self._finish(await self._client._call(call), wait, progress, on_event)

    async def _finish(
        self,
        started: TrainingResult,
        wait: bool,
        progress: bool | ProgressDisplay | None,
        on_event: EventHook | None,
    ) -> TrainingResult:
        if not wait:
            return started
        job = await self._client.jobs.watch(started.job.id, progress=progress, on_event=on_event)
        return finish_training(await self.get(started.adapter.id), job)

    async def list(self, *, view: str = "full") -> builtins.list[Adapter]:
        """Every adapter, oldest first (all pages); see Client.adapters.list."""
        return [a async for a in self.iter(view=view)]

    async def iter(
        self, *, view: str = "full", page_size: int = _calls.PAGE_SIZE
    ) -> AsyncGenerator[Adapter, None]:
        """Adapters a page at a time, as they are needed."""
        cursor: str | None = None
        while True:
            call = _calls.list_adapters(cursor, page_size, view)
            items, cursor = await self._client._call(call)
            for item in items:
                yield item
            if cursor is None:
                return

    async def get(self, adapter: str) -> Adapter:
        return await self._client._call(_calls.get_adapter(adapter))

    async def delete(self, adapter: str) -> None:
        await self._client._call(_calls.delete_adapter(adapter))

    async def predict(
        self,
        adapter: str,
        texts: str | Sequence[str],
        version: int | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_progress: ProgressHook | None = None,
    ) -> PredictionResult:
        """See `Adapters.predict`: any number of texts, split into requests."""
        if isinstance(texts, str) or len(texts) <= batch_size:
            return await self._client._call(_calls.predict(adapter, texts, version))
        return await apredict_all(
            self._client, adapter, texts, version=version, batch_size=batch_size,
            concurrency=concurrency, on_progress=on_progress,
        )  # fmt: skip

    async def batch(
        self,
        adapter: str,
        texts: Sequence[Any] | None = None,
        *,
        file: PathArg | None = None,
        version: int | None = None,
    ) -> BatchSubmission:
        """Like `Client.adapters.batch`."""
        return await self._client._call(_calls.batch(adapter, texts, file, version))

    async def feedback(self, adapter: str, items: FeedbackItems) -> FeedbackResult:
        return await self._client._call(_calls.feedback(adapter, items))

    async def monitoring(self, adapter: str) -> MonitoringReport:
        return await self._client._call(_calls.monitoring(adapter))

    async def download(
        self, adapter: str, version: int | None = None, path: PathArg | None = None
    ) -> Path:
        response = await self._client._call(_calls.download(adapter, version))
        target = _calls.download_target(response, adapter, version, path)
        await asyncio.to_thread(write_file, target, response.content)
        return target

    async def import_(self, path: PathArg, name: str | None = None) -> Adapter:
        call = await asyncio.to_thread(_calls.import_adapter, path, name)
        return await self._client._call(call)


class AsyncVersions(_AsyncResource):
    async def get(self, adapter: str, version: int) -> Version:
        return await self._client._call(_calls.get_version(adapter, version))

    async def list(self, adapter: str) -> builtins.list[Version]:
        return (await self._client.adapters.get(adapter)).versions

    async def promote(self, adapter: str, version: int) -> Adapter:
        return await self._client._call(_calls.promote_version(adapter, version))


class AsyncJobs(_AsyncResource):
    async def get(self, job_id: str) -> Job:
        return await self._client._call(_calls.get_job(job_id))

    async def list(self, adapter: str | None = None, *, view: str = "full") -> builtins.list[Job]:
        """Every job (of one adapter when given), newest first (all pages)."""
        return [j async for j in self.iter(adapter, view=view)]

    async def iter(
        self, adapter: str | None = None, *, view: str = "full", page_size: int = _calls.PAGE_SIZE
    ) -> AsyncGenerator[Job, None]:
        """Jobs a page at a time, as they are needed."""
        cursor: str | None = None
        while True:
            call = _calls.list_jobs(adapter, cursor, page_size, view)
            items, cursor = await self._client._call(call)
            for item in items:
                yield item
            if cursor is None:
                return

    async def cancel(self, job_id: str) -> Job:
        return await self._client._call(_calls.cancel_job(job_id))

    async def results(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """Like `Client.jobs.results`."""
        response = await self._client._call(_calls.job_results(job_id))
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    async def wait_results(
        self, job_id: str, *, poll_seconds: float = 1.0
    ) -> builtins.list[dict[str, Any]]:
        """Like `Client.jobs.wait_results`."""
        while not (job := await self.get(job_id)).done:
            await asyncio.sleep(poll_seconds)
        if job.status != "succeeded":
            raise JobFailed(job)
        return await self.results(job_id)

    async def events(
        self, job_id: str, last_event_id: str | None = None
    ) -> AsyncGenerator[JobEvent, None]:
        response = await self._client._send(_calls.job_events(job_id, last_event_id), stream=True)
        decoder = SSEDecoder()
        try:
            async for line in response.aiter_lines():
                event = decoder.feed(line)
                if event is not None:
                    yield event
        except httpx.TransportError as exc:
            raise StreamInterrupted(
                f"event stream of job {job_id} broke: {describe_error(exc)}"
            ) from exc
        finally:
            await response.aclose()

    async def watch(
        self,
        job_id: str,
        *,
        progress: bool | ProgressDisplay | None = None,
        on_event: EventHook | None = None,
    ) -> Job:
        """See `Client.jobs.watch`."""
        display = make_display(progress)
        state = JobWatch(job_id, [display, *([on_event] if on_event else [])])
        breaks = 0
        try:
            while not state.ended:
                news, error = False, None
                state.new_connection()
                events = self.events(job_id, state.last_event_id)
                try:
                    async for event in events:
                        news = state.accept(event) or news
                        if state.ended:
                            break
                except StreamInterrupted as exc:
                    error = exc
                finally:
                    await events.aclose()
                if state.ended:
                    break
                breaks = 1 if news else breaks + 1
                delay = reconnect_delay(self._client.retry, job_id, breaks, error)
                reason = str(error) if error else "stream closed before the job ended"
                await self._client._pause(
                    RetryEvent("GET", f"/v1/jobs/{job_id}/events", breaks, delay, reason)
                )
        finally:
            display.close()
        return watch_result(state)


class AsyncTenants(_AsyncResource):
    async def create(self, name: str) -> Tenant:
        return await self._client._call(_calls.create_tenant(name))

    async def list(self) -> builtins.list[Tenant]:
        return await self._client._call(_calls.list_tenants())

    async def delete(self, tenant_id: str) -> None:
        """The tenant and everything it owns (keys, adapters, jobs, artifacts)."""
        await self._client._call(_calls.delete_tenant(tenant_id))


class AsyncKeys(_AsyncResource):
    async def create(self, tenant_id: str, scopes: Sequence[str] = ("train", "predict")) -> Key:
        return await self._client._call(_calls.create_key(tenant_id, scopes))

    async def revoke(self, key_id: str) -> None:
        await self._client._call(_calls.revoke_key(key_id))

    async def rotate(self, key_id: str) -> Key:
        """A new key with the same tenant and scopes; the old one is revoked."""
        return await self._client._call(_calls.rotate_key(key_id))

    async def list(
        self, tenant_id: str | None = None, *, include_revoked: bool = False
    ) -> builtins.list[Key]:
        """Keys of a tenant (default the caller's), without secrets."""
        return await self._client._call(_calls.list_keys(tenant_id, include_revoked))

    async def whoami(self) -> Identity:
        """The calling key's tenant and scopes."""
        return await self._client._call(_calls.whoami())
