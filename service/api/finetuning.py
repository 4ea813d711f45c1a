"""OpenAI's fine-tuning flow, mapped onto loradock's adapters and jobs.

- `POST /v1/files` (multipart `file` + `purpose=fine-tune`, JSONL): the file is checked (UTF-8,
  one JSON object per line, within the dataset row limit) and kept in the store until deleted;
  `GET /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.
- `POST /v1/fine_tuning/jobs` creates a generation adapter whose version 1 trains from the files,
  through the same path as `POST /v1/adapters` (every row validated, 400 naming file, row and
  field). The job's id is the loradock job's id; `fine_tuned_model` is the adapter's name
  (`ft-<suffix>-<8 hex>`), usable as `model` in /v1/chat/completions once the job succeeded.
  Hyperparameters (top level or under `method.supervised`): `n_epochs` -> `epochs` (early
  stopping on validation loss still restores the best epoch), `batch_size`,
  `learning_rate_multiplier` x loradock's default learning rate; "auto" keeps loradock's default.
- retrieve, list (`after`, `limit`), cancel, `/events` (newest first) and `/checkpoints` (one per
  epoch, with `step`, `train_loss`, `valid_loss`, `valid_mean_token_accuracy`; the adapter serves
  the best epoch's weights, which `fine_tuned_model` names).

Files and jobs belong to the key's tenant: another tenant's id is a 404. Errors are OpenAI-shaped.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.datastructures import UploadFile

from loradock.adapters.artifacts.store import StoreError
from loradock.adapters.training.data import DatasetError, parse_jsonl
from loradock.adapters.training.hyperparameters import Hyperparameters
from loradock.service.api.completions import base_model_names
from loradock.service.api.deps import DatabaseDep, Principal, ReadyRuntimeDep, require
from loradock.service.api.jobs import cancel
from loradock.service.control import Control
from loradock.service.db.models import File, Job, Version, new_id, utcnow
from loradock.service.errors import BadRequest, NotFound, Unprocessable

router = APIRouter(prefix="/v1", tags=["openai"])
TrainDep = Depends(require("train"))
ReadDep = Depends(require("predict"))
CONTENT = "data.jsonl"
PURPOSES = ("fine-tune",)


def file_key(tenant_id: str, file_id: str) -> str:
    return f"{tenant_id}/files/data/{file_id}"


def _unix(t: datetime | None) -> int | None:
    return int(t.timestamp()) if t is not None else None


# --- files -------------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def file_out(f: File) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=_unix(f.created_at) or 0,
                      filename=f.filename, purpose=f.purpose)  # fmt: skip


def _find_file(s: Any, tenant_id: str, file_id: str, param: str = "file_id") -> File:
    f = s.get(File, file_id)
    if f is None or f.tenant_id != tenant_id:
        raise NotFound(f"no file {file_id!r}", extra={"param": param, "code": "not_found"})
    return f


@router.post("/files", response_model=FileObject)
async def upload_file(
    request: Request, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = TrainDep
) -> FileObject:
    """A JSONL training file (`client.files.create(file=..., purpose="fine-tune")`)."""
    form = await request.form(max_files=1, max_fields=4)
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise BadRequest("file: a multipart file is required", extra={"param": "file"})
    if purpose not in PURPOSES:
        raise BadRequest(f"purpose: {purpose!r} is not supported; use one of {list(PURPOSES)}",
                         extra={"param": "purpose"})  # fmt: skip
    raw = await upload.read()
    filename = (upload.filename or "upload.jsonl")[-256:]
    limit = runtime.settings.max_dataset_rows

    def store() -> FileObject:
        try:
            rows = parse_jsonl(raw, filename)
        except DatasetError as e:
            problem = e.problems[0]
            where = f"line {problem.row}: " if problem.row else ""
            raise BadRequest(f"{filename}: {where}{problem.message}",
                             extra={"param": "file"}) from e  # fmt: skip
        if not rows:
            raise BadRequest(f"{filename} has no rows", extra={"param": "file"})
        if len(rows) > limit:
            raise BadRequest(f"{filename} has {len(rows)} rows; the limit is {limit} (setting "
                             "LORADOCK_MAX_DATASET_ROWS)", extra={"param": "file"})  # fmt: skip
        file_id = new_id("file")
        key = file_key(principal.tenant_id, file_id)
        assert runtime.store is not None
        runtime.store.publish(key, {CONTENT: raw}, {"file_id": file_id})
        try:
            with db.session() as s:
                row = File(id=file_id, tenant_id=principal.tenant_id, filename=filename,
                           purpose=str(purpose), bytes=len(raw), rows=len(rows), key=key,
                           created_at=utcnow())  # fmt: skip
                s.add(row)
                s.flush()
                return file_out(row)
        except Exception:
            runtime.store.delete(key)  # not recorded: no orphan content
            raise

    return await run_in_threadpool(store)


@router.get("/files", response_model=FileList)
def list_files(db: DatabaseDep, principal: Principal = ReadDep) -> FileList:
    with db.session() as s:
        rows = s.scalars(select(File).where(File.tenant_id == principal.tenant_id)
                         .order_by(File.created_at.desc())).all()  # fmt: skip
        return FileList(data=[file_out(f) for f in rows])


@router.get("/files/{file_id}", response_model=FileObject)
def get_file(file_id: str, db: DatabaseDep, principal: Principal = ReadDep) -> FileObject:
    with db.session() as s:
        return file_out(_find_file(s, principal.tenant_id, file_id))


@router.get("/files/{file_id}/content")
def file_content(
    file_id: str, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = ReadDep
) -> Response:
    with db.session() as s:
        key = _find_file(s, principal.tenant_id, file_id).key
    assert runtime.store is not None
    return Response(runtime.store.read(key, CONTENT), media_type="application/jsonl")


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_file(
    file_id: str, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = TrainDep
) -> FileDeleted:
    with db.session() as s:
        f = _find_file(s, principal.tenant_id, file_id)
        key = f.key
        s.delete(f)
    assert runtime.store is not None
    with contextlib.suppress(StoreError):  # the row is gone; the start-up sweep removes it
        runtime.store.delete(key)
    return FileDeleted(id=file_id)


# --- fine-tuning jobs --------------------------------------------------------------------------


class FTHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Literal["auto"] = Field("auto", description="-> epochs (1..50)")
    batch_size: int | Literal["auto"] = Field("auto", description="-> batch_size (1..256)")
    learning_rate_multiplier: float | Literal["auto"] = Field(
        "auto", description="x loradock's default learning rate (0 < m <= 100)"
    )


class FTSupervised(BaseModel):
    model_config = ConfigDict(extra="ignore")
    hyperparameters: FTHyperparameters | None = None


class FTMethod(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["supervised"] = "supervised"
    supervised: FTSupervised | None = None


class FTCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")  # integrations, metadata: accepted, unused

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: FTHyperparameters | None = None
    method: FTMethod | None = None


class FTError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FTJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str] = []
    trained_tokens: int | None
    error: FTError | None
    seed: int
    estimated_finish: int | None = None
    integrations: list[Any] = []
    method: dict[str, Any]


class FTJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FTJob]
    has_more: bool


class FTEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class FTEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FTEvent]
    has_more: bool


class FTCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, float | None]
    fine_tuning_job_id: str


class FTCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FTCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None


def _hyperparameters(body: FTCreate) -> dict[str, Any]:
    """loradock hyperparameters from OpenAI's (top level, else under method.supervised)."""
    ft = body.hyperparameters
    if ft is None and body.method is not None and body.method.supervised is not None:
        ft = body.method.supervised.hyperparameters
    ft = ft or FTHyperparameters.model_validate({})
    hp: dict[str, Any] = {}
    for name, target, most in (("n_epochs", "epochs", 50), ("batch_size", "batch_size", 256)):
        value = getattr(ft, name)
        if value == "auto":
            continue
        if not 1 <= int(value) <= most:
            raise BadRequest(f"hyperparameters.{name} must be 1..{most}",
                             extra={"param": f"hyperparameters.{name}"})  # fmt: skip
        hp[target] = int(value)
    if ft.learning_rate_multiplier != "auto":
        m = float(ft.learning_rate_multiplier)
        if not 0 < m <= 100:
            param = "hyperparameters.learning_rate_multiplier"
            raise BadRequest(f"{param} must be in (0, 100]", extra={"param": param})
        hp["learning_rate"] = Hyperparameters().learning_rate * m
    if body.seed is not None:
        hp["seed"] = body.seed
    return hp


def _rows(runtime: Any, db: Any, tenant_id: str, file_id: str, param: str) -> list[dict]:
    with db.session() as s:
        key = _find_file(s, tenant_id, file_id, param).key
    return parse_jsonl(runtime.store.read(key, CONTENT), file_id)


@router.post("/fine_tuning/jobs", response_model=FTJob)
async def create_ft_job(
    body: FTCreate, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = TrainDep
) -> FTJob:
    """A generation adapter trained from uploaded files (`client.fine_tuning.jobs.create`)."""
    if body.model not in base_model_names(runtime):
        raise NotFound(f"model {body.model!r} cannot be fine-tuned here; this server's base is "
                       f"{base_model_names(runtime)[0]!r}",
                       extra={"param": "model", "code": "model_not_found"})  # fmt: skip
    hp = _hyperparameters(body)
    tenant = principal.tenant_id

    def create() -> FTJob:
        train = _rows(runtime, db, tenant, body.training_file, "training_file")
        val = (_rows(runtime, db, tenant, body.validation_file, "validation_file")
               if body.validation_file else None)  # fmt: skip
        name = f"ft-{body.suffix + '-' if body.suffix else ''}{secrets.token_hex(4)}"
        request = {"name": name, "training_data": train, "hyperparameters": hp,
                   "promote": "always"}  # fmt: skip
        if val is not None:
            request["validation_data"] = val
        try:
            queued = Control(runtime).create(tenant, json.dumps(request).encode())
        except Unprocessable as e:  # the rows: name the file as OpenAI's validation does
            raise BadRequest(f"{body.training_file}: {e.detail}", extra={
                "param": "training_file", "code": "invalid_training_file"}) from e  # fmt: skip
        with db.session() as s:
            job = s.get(Job, queued.job_id)
            assert job is not None
            job.spec = {**job.spec, "openai": {
                "model": body.model, "training_file": body.training_file,
                "validation_file": body.validation_file, "suffix": body.suffix,
                "fine_tuned_model": name,
            }}  # fmt: skip
            s.flush()
            return ft_job_out(s, job)

    return await run_in_threadpool(create)


def _find_ft_job(s: Any, tenant_id: str, job_id: str) -> Job:
    job = s.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id or "openai" not in (job.spec or {}):
        raise NotFound(f"no fine-tuning job {job_id!r}",
                       extra={"param": "fine_tuning_job_id", "code": "not_found"})  # fmt: skip
    return job


def _epochs(job: Job) -> list[dict[str, Any]]:
    return [h for h in (job.history or []) if "epoch" in h and not h.get("partial")
            and "val_loss" in h]  # fmt: skip


def ft_job_out(s: Any, job: Job) -> FTJob:
    spec, meta = job.spec or {}, (job.spec or {}).get("openai", {})
    hp = spec.get("hyperparameters") or {}
    default_lr = Hyperparameters().learning_rate
    status = {"queued": "queued", "running": "running"}.get(job.status, job.status)
    succeeded = job.status == "succeeded"
    tokens = None
    if succeeded:
        ver = s.scalar(select(Version).where(Version.adapter_id == job.adapter_id,
                                             Version.version == job.version))  # fmt: skip
        if ver is not None:
            per_epoch = (ver.report or {}).get("tokens", {}).get("train_targets")
            epochs = (ver.metrics or {}).get("epochs_run")
            tokens = int(per_epoch * epochs) if per_epoch and epochs else None
    error = None
    if job.status == "failed":
        error = FTError(code="training_failed", message=job.error or "training failed")
    return FTJob(
        id=job.id,
        created_at=_unix(job.created_at) or 0,
        finished_at=_unix(job.finished_at),
        model=meta.get("model", ""),
        fine_tuned_model=meta.get("fine_tuned_model") if succeeded else None,
        organization_id=job.tenant_id,
        status=status,
        hyperparameters={
            "n_epochs": hp.get("epochs"),
            "batch_size": hp.get("batch_size"),
            "learning_rate_multiplier": round(hp.get("learning_rate", default_lr) / default_lr, 6),
        },
        training_file=meta.get("training_file", ""),
        validation_file=meta.get("validation_file"),
        trained_tokens=tokens,
        error=error,
        seed=int(hp.get("seed", 0)),
        method={"type": "supervised"},
    )


@router.get("/fine_tuning/jobs", response_model=FTJobList)
def list_ft_jobs(
    db: DatabaseDep, principal: Principal = ReadDep, after: str | None = None, limit: int = 20
) -> FTJobList:
    limit = max(1, min(limit, 100))
    with db.session() as s:
        jobs = [j for j in s.scalars(select(Job).where(Job.tenant_id == principal.tenant_id)
                                     .order_by(Job.created_at.desc(), Job.id.desc()))
                if "openai" in (j.spec or {})]  # fmt: skip
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        page = jobs[:limit]
        return FTJobList(data=[ft_job_out(s, j) for j in page], has_more=len(jobs) > limit)


@router.get("/fine_tuning/jobs/{job_id}", response_model=FTJob)
def get_ft_job(job_id: str, db: DatabaseDep, principal: Principal = ReadDep) -> FTJob:
    with db.session() as s:
        return ft_job_out(s, _find_ft_job(s, principal.tenant_id, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FTJob)
def cancel_ft_job(
    job_id: str, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = TrainDep
) -> FTJob:
    with db.session() as s:
        _find_ft_job(s, principal.tenant_id, job_id)
    cancel(runtime, db, principal.tenant_id, job_id)
    with db.session() as s:
        return ft_job_out(s, _find_ft_job(s, principal.tenant_id, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=FTEventList)
def ft_events(
    job_id: str, db: DatabaseDep, principal: Principal = ReadDep, limit: int = 20,
    after: str | None = None,
) -> FTEventList:  # fmt: skip
    """Job events, newest first: created, started, one metrics event per epoch, the end."""
    with db.session() as s:
        job = _find_ft_job(s, principal.tenant_id, job_id)
        created, started = _unix(job.created_at) or 0, _unix(job.started_at)
        finished = _unix(job.finished_at)
        events = [FTEvent(id=f"{job.id}-created", created_at=created, level="info",
                          message="Created fine-tuning job", type="message")]  # fmt: skip
        if started is not None:
            events.append(FTEvent(id=f"{job.id}-started", created_at=started, level="info",
                                  message="Fine-tuning job started", type="message"))  # fmt: skip
        for h in _epochs(job):
            events.append(FTEvent(
                id=f"{job.id}-epoch-{h['epoch']}", created_at=started or created, level="info",
                message=f"Epoch {h['epoch']}: train loss {h.get('train_loss')}, validation loss "
                        f"{h.get('val_loss')}, token accuracy {h.get('val_token_accuracy')}",
                type="metrics", data={"step": h.get("step"), "epoch": h["epoch"],
                                      "train_loss": h.get("train_loss"),
                                      "valid_loss": h.get("val_loss"),
                                      "valid_mean_token_accuracy": h.get("val_token_accuracy")},
            ))  # fmt: skip
        if job.status in ("succeeded", "failed", "cancelled"):
            level: Literal["info", "error"] = "error" if job.status == "failed" else "info"
            message = {"succeeded": "The job has successfully completed",
                       "cancelled": "The job was cancelled"}.get(
                           job.status, f"The job failed: {job.error}")  # fmt: skip
            events.append(FTEvent(id=f"{job.id}-{job.status}", created_at=finished or created,
                                  level=level, message=message, type="message"))  # fmt: skip
    events.reverse()
    if after is not None:
        ids = [e.id for e in events]
        events = events[ids.index(after) + 1 :] if after in ids else []
    limit = max(1, min(limit, 100))
    return FTEventList(data=events[:limit], has_more=len(events) > limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=FTCheckpointList)
def ft_checkpoints(
    job_id: str, db: DatabaseDep, principal: Principal = ReadDep, limit: int = 10
) -> FTCheckpointList:
    """One checkpoint per validated epoch, newest first. The adapter keeps (and serves) the
    best epoch's weights; other epochs' are not kept, so only the record is listed."""
    with db.session() as s:
        job = _find_ft_job(s, principal.tenant_id, job_id)
        name = (job.spec or {}).get("openai", {}).get("fine_tuned_model", "")
        created = _unix(job.finished_at or job.started_at or job.created_at) or 0
        points = [
            FTCheckpoint(
                id=f"ftckpt-{job.id}-{h['epoch']}", created_at=created,
                fine_tuned_model_checkpoint=f"{name}:ckpt-epoch-{h['epoch']}",
                step_number=int(h.get("step", 0)),
                metrics={"step": float(h.get("step", 0)), "train_loss": h.get("train_loss"),
                         "valid_loss": h.get("val_loss"),
                         "valid_mean_token_accuracy": h.get("val_token_accuracy")},
                fine_tuning_job_id=job.id,
            )
            for h in reversed(_epochs(job))
        ]  # fmt: skip
    limit = max(1, min(limit, 100))
    page = points[:limit]
    return FTCheckpointList(data=page, has_more=len(points) > limit,
                            first_id=page[0].id if page else None,
                            last_id=page[-1].id if page else None)  # fmt: skip
