"""Training jobs: list, read, follow (server-sent events), cancel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from loradock.service.api.adapters import job_out
from loradock.service.api.deps import DatabaseDep, Principal, ReadyRuntimeDep, require
from loradock.service.api.lookup import find_adapter, find_job
from loradock.service.api.schemas import JobList, JobOut
from loradock.service.db.models import Job
from loradock.service.db.registry import Database
from loradock.service.errors import Conflict
from loradock.service.jobs import TERMINAL, finish_cancelled

router = APIRouter(prefix="/v1", tags=["jobs"])
ReadDep = Depends(require("predict"))
TrainDep = Depends(require("train"))
POLL_SECONDS = 0.5


@router.get("/jobs", response_model=JobList)
def list_jobs(
    db: DatabaseDep,
    adapter: str | None = Query(None, description="Only this adapter's jobs (id or name)."),
    principal: Principal = ReadDep,
) -> JobList:
    with db.session() as s:
        q = select(Job).where(Job.tenant_id == principal.tenant_id)
        if adapter is not None:
            q = q.where(Job.adapter_id == find_adapter(s, principal.tenant_id, adapter).id)
        rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id)).all()
        return JobList(jobs=[job_out(j) for j in rows])


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, db: DatabaseDep, principal: Principal = ReadDep) -> JobOut:
    with db.session() as s:
        return job_out(find_job(s, principal.tenant_id, job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(
    job_id: str, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = TrainDep
) -> JobOut:
    """Queued: cancelled at once. Running: stops at its next step and publishes nothing."""
    with db.session() as s:
        job = find_job(s, principal.tenant_id, job_id)
        if job.status in TERMINAL:
            raise Conflict(f"job {job_id} already {job.status}")
        job.cancel_requested = True
        if job.status == "queued":
            finish_cancelled(s, job)
        s.flush()
        out = job_out(job)
    if runtime.jobs is not None:
        runtime.jobs.cancel(job_id)
    return out


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def _snapshot(db: Database, job_id: str) -> JobOut | None:
    with db.session() as s:
        job = s.get(Job, job_id)
        return job_out(job) if job is not None else None


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str, request: Request, db: DatabaseDep, principal: Principal = ReadDep
) -> StreamingResponse:
    """Server-sent events until the job ends: `status`, `progress`, `epoch` (one per validation),
    and a final `end` with the whole job. Reconnecting replays the epochs so far."""
    with db.session() as s:
        find_job(s, principal.tenant_id, job_id)

    async def stream() -> AsyncIterator[bytes]:
        sent_epochs = 0
        last_status = None
        last_progress: dict[str, Any] | None = None
        while True:
            job = await asyncio.to_thread(_snapshot, db, job_id)
            if job is None:
                yield _sse("end", {"id": job_id, "status": "deleted"})
                return
            ended = job.status in TERMINAL
            if job.status != last_status and not ended:
                last_status = job.status
                yield _sse("status", {"id": job.id, "status": job.status})
            if len(job.history) < sent_epochs:  # a new cross-validation fold restarted it
                sent_epochs = 0
            for record in job.history[sent_epochs:]:
                yield _sse("epoch", record)
            sent_epochs = len(job.history)
            if job.progress != last_progress:
                last_progress = job.progress
                yield _sse("progress", job.progress)
            if ended:  # after the last epochs and progress, so a final status is really final
                if job.status != last_status:
                    yield _sse("status", {"id": job.id, "status": job.status})
                yield _sse("end", job.model_dump(mode="json"))
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_SECONDS)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
