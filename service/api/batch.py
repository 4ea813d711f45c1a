"""Batch prediction jobs (service/batchjobs.py): submit a file of texts, follow the job like any
other (GET /v1/jobs/{id}, its events, cancel), then download the predictions file."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from loradock.adapters.artifacts.store import StoreError
from loradock.service import batchjobs
from loradock.service.api.adapters import job_out
from loradock.service.api.deps import DatabaseDep, Principal, ReadyRuntimeDep, require
from loradock.service.api.schemas import MAX_VERSION
from loradock.service.control import Control
from loradock.service.db.models import Job
from loradock.service.errors import BadRequest, Conflict, NotFound, Unprocessable
from loradock.service.lookup import find_job

router = APIRouter(prefix="/v1", tags=["batch"])
ReadDep = Depends(require("predict"))
SHOWN_ERRORS = 5

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["inputs"], "additionalProperties": False,
                "properties": {
                    "inputs": {"type": "array", "items": {}, "minItems": 1,
                               "description": "texts, or objects {text, id?}"},
                    "version": {"type": ["integer", "null"], "minimum": 1,
                                "maximum": MAX_VERSION},
                },
            }},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["input_file"],
                "properties": {
                    "input_file": {"type": "string", "format": "binary",
                                   "description": "JSONL, CSV with a text column, or .txt"},
                    "version": {"type": "integer", "minimum": 1, "maximum": MAX_VERSION},
                },
            }},
        },
    }
}  # fmt: skip


async def _read(request: Request) -> tuple[bytes | list[Any], str | None, int | None]:
    """(the rows or the file's bytes, the file name, the version asked for)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=5)
        upload = form.get("input_file")
        if not isinstance(upload, UploadFile):
            raise Unprocessable("a multipart batch needs an input_file")
        unknown = sorted(set(form.keys()) - {"input_file", "version"})
        if unknown:
            raise Unprocessable(f"unexpected form fields {unknown}")
        return await upload.read(), upload.filename, _version(form.get("version"))
    try:
        body = await asyncio.to_thread(json.loads, await request.body())
    except ValueError as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise Unprocessable('the body must be {"inputs": [...], "version": optional}')
    unknown = sorted(set(body) - {"inputs", "version"})
    if unknown:
        raise Unprocessable(f"unexpected fields {unknown}")
    return body["inputs"], None, _version(body.get("version"))


def _version(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise Unprocessable(f"version must be an integer, got {str(value)[:20]!r}") from None
    if isinstance(value, bool) or not 1 <= number <= MAX_VERSION:
        raise Unprocessable(f"version must be between 1 and {MAX_VERSION}")
    return number


@router.post(
    "/adapters/{adapter}/batch", status_code=202, openapi_extra=_BODY_DOC,
    responses={202: {"description": "the queued job"}},
)  # fmt: skip
async def create_batch(
    adapter: str, request: Request, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> dict[str, Any]:
    """Predict every row of a file (or a long list) in the background; follow the returned job,
    then GET /v1/jobs/{id}/results. Rows that cannot be predicted are reported in their place."""
    raw, filename, version = await _read(request)
    s = runtime.settings
    try:
        batch = await asyncio.to_thread(
            batchjobs.parse_inputs, raw, filename,
            max_rows=s.max_batch_job_rows, max_text_chars=s.max_text_chars,
        )  # fmt: skip
    except batchjobs.BatchInputError as e:
        raise Unprocessable(str(e)) from None
    job_id, number = await run_in_threadpool(
        Control(runtime).queue_batch, principal.tenant_id, adapter, version, batch
    )
    assert runtime.db is not None
    with runtime.db.session() as session:
        job = job_out(session.get(Job, job_id))
    warnings = []
    if batch.errors:
        first = sorted(batch.errors)[:SHOWN_ERRORS]
        shown = "; ".join(f"row {i + 1}: {batch.errors[i]}" for i in first)
        warnings.append(f"{len(batch.errors)} of {len(batch.texts)} rows cannot be predicted and "
                        f"are reported as errors in the results ({shown})")  # fmt: skip
    return {
        "job": job.model_dump(mode="json"),
        "version": number,
        "rows": len(batch.texts),
        "rows_failed": len(batch.errors),
        "warnings": warnings,
    }


@router.get(
    "/jobs/{job_id}/results",
    response_class=Response,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
def job_results(
    job_id: str, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = ReadDep
) -> Response:
    """A finished prediction job's `predictions.jsonl`: a line per input row, in input order."""
    with db.session() as s:
        job = find_job(s, principal.tenant_id, job_id)
        if job.kind != batchjobs.KIND:
            raise NotFound(f"job {job_id} is a {job.kind} job; only prediction jobs have results")
        if job.status != "succeeded":
            done = (job.progress or {}).get("rows_done", 0)
            raise Conflict(f"job {job_id} is {job.status} ({done} of "
                           f"{(job.progress or {}).get('rows', '?')} rows done); results come "
                           "when it has succeeded")  # fmt: skip
        key = batchjobs.batch_key(job.tenant_id, job.adapter_id, job.id)
    assert runtime.store is not None
    try:
        data = runtime.store.read(key, batchjobs.OUTPUT_FILE)
    except StoreError as e:
        raise Conflict(f"the results of job {job_id} cannot be read: {e}") from e
    return Response(
        data,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.jsonl"'},
    )
