"""Adapters and their versions: create (train), list, read, retrain, promote, download, delete."""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from loradock.adapters.artifacts import META
from loradock.adapters.data import (
    Dataset,
    DatasetError,
    check_split_feasible,
    check_validation_labels,
    parse_upload,
    remove_leakage,
    validate_rows,
)
from loradock.adapters.importing import ImportRejected, ImportTooLarge, read_zip, validate_import
from loradock.adapters.store import MANIFEST, StoreError, artifact_key
from loradock.service.api.deps import DatabaseDep, Principal, ReadyRuntimeDep, now, require
from loradock.service.api.lookup import find_adapter, find_version
from loradock.service.api.schemas import (
    NAME_PATTERN,
    AdapterAndJob,
    AdapterCreate,
    AdapterList,
    AdapterOut,
    JobOut,
    VersionCreate,
    VersionOut,
)
from loradock.service.db.models import Adapter, Job, Version, new_id
from loradock.service.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unprocessable,
)
from loradock.service.jobs import DATASET_FILE, dataset_key, encode_dataset
from loradock.service.runtime import Runtime

router = APIRouter(prefix="/v1", tags=["adapters"])
T = TypeVar("T", bound=VersionCreate)
TrainDep = Depends(require("train"))
ReadDep = Depends(require("predict"))
ACTIVE_JOB = ("queued", "running")


def _body_doc(schema: str) -> dict[str, Any]:
    """OpenAPI for a body that is JSON (`schema`) or a multipart upload with training_file."""
    form_fields: dict[str, Any] = {
        "training_file": {
            "type": "string",
            "format": "binary",
            "description": "JSONL or CSV with columns text,label[,group]",
        },
        "validation_file": {"type": "string", "format": "binary"},
        "validation_split": {"type": "number"},
        "hyperparameters": {"type": "string", "description": "a JSON object"},
        "promote": {"type": "string", "enum": ["always", "if_better", "never"]},
    }
    required = ["training_file"]
    if schema == "AdapterCreate":
        form_fields["name"] = {"type": "string"}
        form_fields["task"] = {"type": "string", "enum": ["classification", "regression"]}
        required.append("name")
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}},
                "multipart/form-data": {
                    "schema": {"type": "object", "required": required, "properties": form_fields}
                },
            },
        }
    }


# --- serialisation -----------------------------------------------------------------------------


def version_out(ver: Version, live_version: int | None) -> VersionOut:
    return VersionOut(
        version=ver.version,
        status=ver.status,
        metrics=ver.metrics or {},
        history=ver.history or [],
        baseline=ver.baseline or {},
        report=ver.report or {},
        hyperparameters=ver.hyperparameters or {},
        live=ver.version == live_version,
        created_at=ver.created_at,
    )


def adapter_out(s: Session, adapter: Adapter) -> AdapterOut:
    versions = s.scalars(
        select(Version).where(Version.adapter_id == adapter.id).order_by(Version.version)
    ).all()
    return AdapterOut(
        id=adapter.id,
        name=adapter.name,
        task=adapter.task,
        labels=adapter.labels or [],
        live_version=adapter.live_version,
        status=adapter.status,
        created_at=adapter.created_at,
        versions=[version_out(v, adapter.live_version) for v in versions],
    )


def job_out(job: Job) -> JobOut:
    return JobOut.model_validate(job, from_attributes=True)


# --- request parsing ---------------------------------------------------------------------------


async def _parse_body(request: Request, model: type[T]) -> T:
    """A JSON body, or a multipart form with training_file (JSONL/CSV) and form fields."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        return await _parse_multipart(request, model)
    try:
        raw = await request.body()
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Unprocessable(f"body is not valid JSON: {e}") from e
    return _validate(model, body)


async def _parse_multipart(request: Request, model: type[T]) -> T:
    form = await request.form(max_files=2, max_fields=20)
    body: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in ("training_file", "validation_file"):
                raise Unprocessable(f"unexpected file field {key!r}")
            raw = await value.read()
            target = "training_data" if key == "training_file" else "validation_data"
            try:
                body[target] = parse_upload(raw, value.filename, target)
            except DatasetError as e:
                raise _dataset_problem(e) from e
        elif key == "hyperparameters":
            try:
                body[key] = json.loads(str(value)) if str(value).strip() else {}
            except json.JSONDecodeError as e:
                raise Unprocessable(f"hyperparameters: not a JSON object: {e}") from e
        else:
            body[key] = value
    if "training_data" not in body:
        raise Unprocessable("multipart upload needs a training_file (JSONL or CSV)")
    return _validate(model, body)


def _validate(model: type[T], body: Any) -> T:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = [
            {"loc": ["body", *[str(p) for p in err["loc"]]], "msg": err["msg"], "type": err["type"]}
            for err in e.errors()
        ]
        first = errors[0]
        where = ".".join(first["loc"][1:]) or "body"
        raise Unprocessable(f"{where}: {first['msg']}", extra={"errors": errors}) from e


def _dataset_problem(e: DatasetError) -> Unprocessable:
    return Unprocessable(str(e), extra={"errors": [p.as_dict() for p in e.problems]})


def _check_servable(runtime: Runtime, body: VersionCreate) -> None:
    """Refuse to train what the serving slots could not hold."""
    hp = body.hyperparameters
    limit = runtime.settings.max_lora_rank
    if hp.rank > limit:
        raise Unprocessable(
            f"hyperparameters.rank: {hp.rank} > max_lora_rank {limit} of this server "
            "(setting LORADOCK_MAX_LORA_RANK)"
        )
    served = runtime.serve_targets()
    unknown = sorted(set(hp.target_modules or []) - set(served))
    if unknown:
        raise Unprocessable(
            f"hyperparameters.target_modules: {unknown} are not served by this server "
            f"(serving targets: {served}; setting LORADOCK_SERVE_TARGET_MODULES)"
        )


def _datasets(runtime: Runtime, task: str, body: VersionCreate) -> tuple[Dataset, Dataset | None]:
    _check_servable(runtime, body)
    s = runtime.settings
    try:
        train = validate_rows(
            body.training_data,
            task,  # type: ignore[arg-type]
            max_rows=s.max_dataset_rows,
            max_text_chars=s.max_text_chars,
        )
        val = None
        if body.validation_data is not None:
            val = validate_rows(
                body.validation_data,
                task,  # type: ignore[arg-type]
                max_rows=s.max_dataset_rows,
                max_text_chars=s.max_text_chars,
                dataset="validation_data",
                min_rows=2,
            )
            check_validation_labels(train, val)
            remove_leakage(train, val)
        else:
            check_split_feasible(train, body.validation_split)
    except DatasetError as e:
        raise _dataset_problem(e) from e
    return train, val


def _queue(
    runtime: Runtime,
    s: Session,
    principal: Principal,
    adapter: Adapter,
    version: int,
    body: VersionCreate,
    train: Dataset,
    val: Dataset | None,
) -> Job:
    """Store the dataset, then add version + job rows (the caller's transaction commits them)."""
    assert runtime.store is not None
    waiting = s.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == principal.tenant_id, Job.status == "queued")
    )
    limit = runtime.settings.max_queued_jobs_per_tenant
    if (waiting or 0) >= limit:
        raise TooManyRequests(
            f"this tenant has {waiting} jobs waiting to train, the limit is {limit} "
            "(setting LORADOCK_MAX_QUEUED_JOBS_PER_TENANT); retry when one has started",
            retry_after=30,
        )
    job = Job(
        id=new_id("job"),
        tenant_id=principal.tenant_id,
        adapter_id=adapter.id,
        version=version,
        status="queued",
        spec={
            "hyperparameters": body.hyperparameters.model_dump(exclude_defaults=True),
            "promote": body.promote,
        },
        created_at=now(),
    )
    runtime.store.publish(
        dataset_key(principal.tenant_id, adapter.id, job.id),
        {DATASET_FILE: encode_dataset(adapter.task, train, val, body.validation_split)},
    )
    s.add(
        Version(
            adapter_id=adapter.id,
            version=version,
            status="training",
            hyperparameters=body.hyperparameters.model_dump(),
            report={"warnings": train.warnings + (val.warnings if val else [])},
            created_at=now(),
        )
    )
    s.add(job)
    return job


def _check_new_adapter(s: Session, runtime: Runtime, tenant_id: str, name: str) -> None:
    count = s.scalar(
        select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant_id)
    )
    limit = runtime.settings.max_adapters_per_tenant
    if (count or 0) >= limit:
        raise Conflict(
            f"this tenant has {count} adapters, the limit is {limit} "
            "(setting LORADOCK_MAX_ADAPTERS_PER_TENANT); delete one first"
        )
    if s.scalar(select(Adapter.id).where(Adapter.tenant_id == tenant_id, Adapter.name == name)):
        raise Conflict(f"an adapter named {name!r} already exists")


# --- routes ------------------------------------------------------------------------------------


@router.post(
    "/adapters",
    status_code=202,
    response_model=AdapterAndJob,
    openapi_extra=_body_doc("AdapterCreate"),
)
async def create_adapter(
    request: Request,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    principal: Principal = TrainDep,
) -> AdapterAndJob:
    body = await _parse_body(request, AdapterCreate)
    train, val = _datasets(runtime, body.task, body)
    try:
        with db.session() as s:
            _check_new_adapter(s, runtime, principal.tenant_id, body.name)
            adapter = Adapter(
                id=new_id("ad"),
                tenant_id=principal.tenant_id,
                name=body.name,
                task=body.task,
                labels=train.labels,
                status="training",
                created_at=now(),
                updated_at=now(),
            )
            s.add(adapter)
            s.flush()
            job = _queue(runtime, s, principal, adapter, 1, body, train, val)
            s.flush()
            result = AdapterAndJob(adapter=adapter_out(s, adapter), job=job_out(job))
    except IntegrityError as e:
        raise Conflict(f"an adapter named {body.name!r} already exists") from e
    if runtime.jobs is not None:
        runtime.jobs.wake()
    return result


_IMPORT_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "a version zip as GET /download returns it",
                        },
                        "name": {
                            "type": "string",
                            "pattern": NAME_PATTERN,
                            "description": "default: the zip's file name without -vN.zip",
                        },
                    },
                }
            }
        },
    }
}


def _import_name(given: str | None, filename: str | None) -> str:
    name = given
    if name is None and filename:
        name = re.sub(r"(-v\d+)?\.zip$", "", filename.rsplit("/", 1)[-1], flags=re.IGNORECASE)
    if not name or not re.match(NAME_PATTERN, name):
        raise Unprocessable(
            f"name: {name!r} is not a valid adapter name (letters, digits, '_', '.', '-'; "
            "pass the form field name)"
        )
    return name


@router.post(
    "/adapters/import", status_code=201, response_model=AdapterOut, openapi_extra=_IMPORT_DOC
)
async def import_adapter(
    request: Request,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    principal: Principal = TrainDep,
) -> AdapterOut:
    """A new adapter whose version 1 is a verified upload (a zip from GET .../download)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Unprocessable("send the zip as multipart/form-data with the field 'file'")
    form = await request.form(max_files=1, max_fields=2)
    upload, given = form.get("file"), form.get("name")
    if not isinstance(upload, UploadFile):
        raise Unprocessable("file: a zip file upload is required")
    if given is not None and not isinstance(given, str):
        raise Unprocessable("name: must be a form field, not a file")
    name = _import_name(given, upload.filename)
    cap = runtime.settings.max_import_bytes
    data = await upload.read(cap + 1)
    serving = runtime.require_serving()
    base = serving.engine.base
    try:
        files = read_zip(data, max_bytes=cap)
        imported = await run_in_threadpool(
            validate_import,
            files,
            base,
            served_modules=serving.engine.pool.names,
            max_rank=serving.engine.pool.max_rank,
        )
    except ImportTooLarge as e:
        raise PayloadTooLarge(f"{e} (setting LORADOCK_MAX_IMPORT_BYTES)") from e
    except ImportRejected as e:
        raise Unprocessable(f"file: {e}") from e
    with db.session() as s:  # fail fast before writing anything
        _check_new_adapter(s, runtime, principal.tenant_id, name)
    adapter_id = new_id("ad")
    key = artifact_key(principal.tenant_id, adapter_id, 1)
    origin = {k: imported.meta.get(k) for k in ("adapter_id", "version")}
    meta = {**imported.meta, "adapter_id": adapter_id, "version": 1, "imported_from": origin}
    files = {**imported.files, META: json.dumps(meta, indent=2, sort_keys=True).encode()}
    assert runtime.store is not None
    await run_in_threadpool(runtime.store.publish, key, files, {"adapter_id": adapter_id})
    try:
        with db.session() as s:
            _check_new_adapter(s, runtime, principal.tenant_id, name)
            adapter = Adapter(
                id=adapter_id,
                tenant_id=principal.tenant_id,
                name=name,
                task=imported.task,
                labels=imported.labels,
                status="ready",
                live_version=1,
                created_at=now(),
                updated_at=now(),
            )
            s.add(adapter)
            s.flush()
            metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
            baseline = meta.get("baseline") if isinstance(meta.get("baseline"), dict) else {}
            s.add(
                Version(
                    adapter_id=adapter_id,
                    version=1,
                    status="ready",
                    hyperparameters=meta.get("hyperparameters") or {},
                    metrics={**(metrics or {}), "winner": meta.get("winner")},
                    history=[],
                    baseline=baseline or {},
                    report={"labels": imported.labels, "imported_from": origin},
                    artifact_key=key,
                    base_fingerprint=base.fingerprint,
                    created_at=now(),
                )
            )
            s.flush()
            return adapter_out(s, adapter)
    except BaseException as e:
        runtime.store.delete(key)  # no registry row: the artifact must not outlive the attempt
        if isinstance(e, IntegrityError):
            raise Conflict(f"an adapter named {name!r} already exists") from e
        raise


@router.get("/adapters", response_model=AdapterList)
def list_adapters(db: DatabaseDep, principal: Principal = ReadDep) -> AdapterList:
    with db.session() as s:
        rows = s.scalars(
            select(Adapter)
            .where(Adapter.tenant_id == principal.tenant_id)
            .order_by(Adapter.created_at, Adapter.id)
        ).all()
        return AdapterList(adapters=[adapter_out(s, a) for a in rows])


@router.get("/adapters/{adapter}", response_model=AdapterOut)
def get_adapter(adapter: str, db: DatabaseDep, principal: Principal = ReadDep) -> AdapterOut:
    with db.session() as s:
        return adapter_out(s, find_adapter(s, principal.tenant_id, adapter))


@router.delete("/adapters/{adapter}", status_code=204, response_class=Response)
def delete_adapter(
    adapter: str, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = TrainDep
) -> Response:
    with db.session() as s:
        row = find_adapter(s, principal.tenant_id, adapter)
        adapter_id = row.id
        active = s.scalars(
            select(Job.id).where(Job.adapter_id == adapter_id, Job.status.in_(ACTIVE_JOB))
        ).all()
        s.delete(row)  # versions, jobs and feedback go with it (ON DELETE CASCADE)
    if runtime.jobs is not None:
        for job_id in active:
            runtime.jobs.cancel(job_id)
    if runtime.serving is not None:  # stops serving at once; its slots free after in-flight use
        runtime.serving.live.invalidate(adapter_id)
        runtime.serving.engine.pool.drop(adapter_id)
    if runtime.monitor is not None:
        runtime.monitor.forget(adapter_id)
    assert runtime.store is not None
    runtime.store.delete_prefix(f"{principal.tenant_id}/{adapter_id}")
    return Response(status_code=204)


@router.post(
    "/adapters/{adapter}/versions",
    status_code=202,
    response_model=AdapterAndJob,
    openapi_extra=_body_doc("VersionCreate"),
)
async def create_version(
    adapter: str,
    request: Request,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    principal: Principal = TrainDep,
) -> AdapterAndJob:
    body = await _parse_body(request, VersionCreate)
    with db.session() as s:
        task = find_adapter(s, principal.tenant_id, adapter).task
    train, val = _datasets(runtime, task, body)
    try:
        with db.session() as s:
            row = find_adapter(s, principal.tenant_id, adapter)
            busy = s.scalar(
                select(Job.id).where(Job.adapter_id == row.id, Job.status.in_(ACTIVE_JOB))
            )
            if busy:
                raise Conflict(
                    f"adapter {row.name!r} is already training (job {busy}); wait or cancel it"
                )
            latest = s.scalar(select(func.max(Version.version)).where(Version.adapter_id == row.id))
            job = _queue(runtime, s, principal, row, (latest or 0) + 1, body, train, val)
            s.flush()
            result = AdapterAndJob(adapter=adapter_out(s, row), job=job_out(job))
    except IntegrityError as e:
        raise Conflict("another version was created at the same time; retry") from e
    if runtime.jobs is not None:
        runtime.jobs.wake()
    return result


@router.get("/adapters/{adapter}/versions/{version}", response_model=VersionOut)
def get_version(
    adapter: str, version: int, db: DatabaseDep, principal: Principal = ReadDep
) -> VersionOut:
    with db.session() as s:
        row = find_adapter(s, principal.tenant_id, adapter)
        return version_out(find_version(s, row, version), row.live_version)


@router.post("/adapters/{adapter}/versions/{version}/promote", response_model=AdapterOut)
def promote_version(
    adapter: str,
    version: int,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    principal: Principal = TrainDep,
) -> AdapterOut:
    """Make `version` live (also how to roll back). In-flight requests finish on the old one."""
    with db.session() as s:
        row = find_adapter(s, principal.tenant_id, adapter)
        ver = find_version(s, row, version)
        if ver.status != "ready":
            raise Conflict(f"version {version} is {ver.status}, only a ready version can be live")
        row.live_version = ver.version
        row.labels = (ver.report or {}).get("labels", row.labels)
        row.status = "ready"
        row.updated_at = now()
        s.flush()
        out = adapter_out(s, row)
    # committed: from now on every request resolves to the new version
    if runtime.serving is not None:
        runtime.serving.live.invalidate(out.id)
    return out


@router.get(
    "/adapters/{adapter}/download",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}},
)
def download_version(
    adapter: str,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    version: int | None = Query(None, ge=1, description="Default: the live version."),
    principal: Principal = ReadDep,
) -> Response:
    """A zip of the version's files: PEFT adapter, head, profile, loradock.json and manifest."""
    with db.session() as s:
        row = find_adapter(s, principal.tenant_id, adapter)
        number = version or row.live_version
        if number is None:
            raise NotFound(f"adapter {row.name!r} has no live version; pass ?version=N")
        ver = find_version(s, row, number)
        if ver.status != "ready" or not ver.artifact_key:
            raise Conflict(
                f"version {number} is {ver.status}; only ready versions can be downloaded"
            )
        key, name = ver.artifact_key, row.name
    assert runtime.store is not None
    buf = io.BytesIO()
    try:
        manifest = runtime.store.manifest(key)
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for fname in sorted(manifest.files):
                zf.writestr(fname, runtime.store.read(key, fname))
            zf.writestr(MANIFEST, manifest.to_json())
    except StoreError as e:
        raise Conflict(f"the artifact of version {number} cannot be read: {e}") from e
    filename = f"{name}-v{number}.zip"
    return Response(
        buf.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
