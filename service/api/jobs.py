"""Training jobs: list, read, follow (server-sent events), cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy import select

from loradock.service.api import pagination
from loradock.service.api.adapters import job_out
from loradock.service.api.deps import DatabaseDep, Principal, ReadyRuntimeDep, require
from loradock.service.api.schemas import JobList, JobOut, JobSummary
from loradock.service.db.models import ApiKey, Job
from loradock.service.db.registry import Database
from loradock.service.errors import Conflict
from loradock.service.jobs import TERMINAL, drop_dataset, finish_cancelled
from loradock.service.lookup import find_adapter, find_job

router = APIRouter(prefix="/v1", tags=["jobs"])
ReadDep = Depends(require("predict"))
TrainDep = Depends(require("train"))
POLL_SECONDS = 0.5


@router.get("/jobs", response_model=JobList)
def list_jobs(
    db: DatabaseDep,
    adapter: str | None = Query(None, description="Only this adapter's jobs (id or name)."),
    limit: pagination.Limit = pagination.DEFAULT_LIMIT,
    cursor: pagination.CursorParam = None,
    view: pagination.View = "full",
    principal: Principal = ReadDep,
) -> JobList:
    """The tenant's jobs, newest first, a page at a time (`next_cursor` leads on)."""
    with db.session() as s:
        q = select(Job).where(Job.tenant_id == principal.tenant_id)
        if adapter is not None:
            q = q.where(Job.adapter_id == find_adapter(s, principal.tenant_id, adapter).id)
        if cursor is not None:
            key = pagination.decode("jobs", cursor)
            q = q.where(pagination.after(Job.created_at, Job.id, key, newest_first=True))
        found = s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit + 1)).all()
        rows, next_cursor = pagination.cut("jobs", found, limit)
        jobs: list[JobOut] | list[JobSummary] = (
            [job_out(j) for j in rows]
            if view == "full"
            else [JobSummary.model_validate(j, from_attributes=True) for j in rows]
        )
        return JobList(jobs=jobs, next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, db: DatabaseDep, principal: Principal = ReadDep) -> JobOut:
    with db.session() as s:
        return job_out(find_job(s, principal.tenant_id, job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(
    job_id: str, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = TrainDep
) -> JobOut:
    """Queued: cancelled at once. Running: stops at its next step and publishes nothing."""
    return cancel(runtime, db, principal.tenant_id, job_id)


def cancel(runtime: Any, db: Database, tenant_id: str, job_id: str) -> JobOut:
    """Cancel one of the tenant's jobs (409 when it already ended); what the routes share."""
    with db.session() as s:
        job = find_job(s, tenant_id, job_id)
        if job.status in TERMINAL:
            raise Conflict(f"job {job_id} already {job.status}")
        job.cancel_requested = True
        if job.status == "queued":
            finish_cancelled(s, job)
        s.flush()
        out = job_out(job)
    if runtime.jobs is not None:
        runtime.jobs.cancel(job_id)
    if out.status == "cancelled" and runtime.store is not None:
        drop_dataset(db, runtime.store, job_id)
    return out


def _snapshot(db: Database, job_id: str) -> JobOut | None:
    with db.session() as s:
        job = s.get(Job, job_id)
        return job_out(job) if job is not None else None


def _own_job(job_id: str, db: DatabaseDep, principal: Principal = ReadDep) -> tuple[str, str]:
    """404 before the stream starts when the job is not the caller's; (job id, key id)."""
    with db.session() as s:
        return find_job(s, principal.tenant_id, job_id).id, principal.key_id


def _key_revoked(db: Database, key_id: str) -> bool:
    with db.session() as s:
        key = s.get(ApiKey, key_id)
        return key is None or key.revoked_at is not None


def _resume_point(last_event_id: str | None) -> tuple[int, int]:
    """(attempt, epochs already received) from a `Last-Event-ID` of `<attempt>-<index>`."""
    try:
        attempt, index = (last_event_id or "").split("-", 1)
        return int(attempt), int(index) + 1
    except ValueError:
        return 0, 0


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    request: Request,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    owned: tuple[str, str] = Depends(_own_job),
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events until the job ends: `status`, `progress`, `epoch` (one per stored
    validation record, each exactly once, every fold's and the final fit's), and a final `end`
    with the whole job. Epochs carry `id: <attempt>-<index>`: reconnecting with `Last-Event-ID`
    resumes after that epoch (a new attempt of a re-queued job starts its epochs over). A
    `: keep-alive` comment goes out whenever nothing else was sent for a while, so proxies with
    idle timeouts keep the stream open while the job waits or trains.

    The caller's key is checked again at every poll: revoking it ends the stream with an `error`
    event. A stream lasts at most LORADOCK_EVENTS_MAX_SECONDS; it then ends with a comment, and
    the client reconnects with `Last-Event-ID` (as after any disconnect)."""
    job_id, key_id = owned
    resume_attempt, sent = _resume_point(last_event_id)
    deadline = time.monotonic() + runtime.settings.events_max_seconds
    keepalive = runtime.settings.events_keepalive_seconds
    last_status = None
    last_progress: dict[str, Any] | None = None
    last_sent = time.monotonic()
    while True:
        if await asyncio.to_thread(_key_revoked, db, key_id):
            yield ServerSentEvent(
                event="error", data={"status": 401, "detail": "the API key was revoked"}
            )
            return
        if time.monotonic() >= deadline:
            yield ServerSentEvent(comment="stream lifetime reached; reconnect with Last-Event-ID")
            return
        job = await asyncio.to_thread(_snapshot, db, job_id)
        if job is None:
            yield ServerSentEvent(event="end", data={"id": job_id, "status": "deleted"})
            return
        if job.attempts != resume_attempt:  # a new attempt writes a new history
            resume_attempt, sent = job.attempts, 0
        out: list[ServerSentEvent] = []
        ended = job.status in TERMINAL
        if job.status != last_status and not ended:
            last_status = job.status
            out.append(ServerSentEvent(event="status", data={"id": job.id, "status": job.status}))
        for i in range(sent, len(job.history)):
            out.append(
                ServerSentEvent(event="epoch", data=job.history[i], id=f"{job.attempts}-{i}")
            )
        sent = max(sent, len(job.history))
        if job.progress != last_progress:
            last_progress = job.progress
            out.append(ServerSentEvent(event="progress", data=job.progress))
        if ended:  # after the last epochs and progress, so a final status is really final
            if job.status != last_status:
                out.append(
                    ServerSentEvent(event="status", data={"id": job.id, "status": job.status})
                )
            out.append(ServerSentEvent(event="end", data=job.model_dump(mode="json")))
        if not out and time.monotonic() - last_sent >= keepalive:
            out.append(ServerSentEvent(comment="keep-alive"))
        for event in out:
            yield event
            last_sent = time.monotonic()
        if ended or await request.is_disconnected():
            return
        await asyncio.sleep(POLL_SECONDS)
