"""Adapters and their versions: create (train), list, read, retrain, promote, download, export,
delete."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as FastAPIPath
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from loradock.adapters import tasks
from loradock.adapters.artifacts.export import ExportError, export_files, zip_files
from loradock.adapters.artifacts.files import ArtifactError, load_adapter
from loradock.adapters.artifacts.store import MANIFEST, StoreError
from loradock.service.api import pagination
from loradock.service.api.deps import (
    DatabaseDep,
    Principal,
    ReadyRuntimeDep,
    RuntimeDep,
    require,
)
from loradock.service.api.schemas import (
    MAX_VERSION,
    NAME_PATTERN,
    AdapterAndJob,
    AdapterList,
    AdapterOut,
    AdapterSummary,
    JobOut,
    VersionOut,
    reserved_name_problem,
)
from loradock.service.control import Control, Queued
from loradock.service.datasets import Form
from loradock.service.db.models import Adapter, Job, Version
from loradock.service.db.registry import Database
from loradock.service.errors import Conflict, NotFound, Unprocessable
from loradock.service.lookup import find_adapter, find_version

VersionPath = Annotated[int, FastAPIPath(ge=1, le=MAX_VERSION)]

router = APIRouter(prefix="/v1", tags=["adapters"])
TrainDep = Depends(require("train"))
ReadDep = Depends(require("predict"))


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
        form_fields["task"] = {"type": "string", "enum": tasks.names()}
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


def adapter_out(
    s: Session, adapter: Adapter, versions: Sequence[Version] | None = None
) -> AdapterOut:
    if versions is None:
        versions = s.scalars(
            select(Version).where(Version.adapter_id == adapter.id).order_by(Version.version)
        ).all()
    return AdapterOut(
        **_fields(adapter), versions=[version_out(v, adapter.live_version) for v in versions]
    )


def _fields(adapter: Adapter) -> dict[str, Any]:
    return {
        "id": adapter.id,
        "name": adapter.name,
        "task": adapter.task,
        "labels": adapter.labels or [],
        "live_version": adapter.live_version,
        "status": adapter.status,
        "created_at": adapter.created_at,
    }


def job_out(job: Job) -> JobOut:
    return JobOut.model_validate(job, from_attributes=True)


# --- request parsing ---------------------------------------------------------------------------


async def _read_body(request: Request) -> Form | bytes:
    """The raw request: JSON bytes, or a multipart form's fields and file bytes, not parsed yet
    (the dataset worker parses and validates it, away from the event loop)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        return await request.body()
    form = await request.form(max_files=2, max_fields=20)
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in fields:
            raise Unprocessable(f"the form field {key!r} is given more than once")
        if isinstance(value, UploadFile):
            if key not in ("training_file", "validation_file"):
                raise Unprocessable(f"unexpected file field {key!r}")
            fields[key] = (await value.read(), value.filename)
        else:
            fields[key] = value
    return fields


def _adapter_and_job(db: Database, queued: Queued) -> AdapterAndJob:
    with db.session() as s:
        adapter = s.get(Adapter, queued.adapter_id)
        job = s.get(Job, queued.job_id)
        assert adapter is not None
        assert job is not None
        return AdapterAndJob(adapter=adapter_out(s, adapter), job=job_out(job))


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
    raw = await _read_body(request)

    def create() -> AdapterAndJob:
        return _adapter_and_job(db, Control(runtime).create(principal.tenant_id, raw))

    return await run_in_threadpool(create)


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
    problem = reserved_name_problem(name)
    if problem is not None:
        raise Unprocessable(f"name: {problem}; pass another in the form field name")
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
    data = await upload.read(runtime.settings.max_import_bytes + 1)

    def imported() -> AdapterOut:
        adapter_id = Control(runtime).import_version(principal.tenant_id, name, data)
        with db.session() as s:
            return adapter_out(s, find_adapter(s, principal.tenant_id, adapter_id))

    return await run_in_threadpool(imported)


@router.get("/adapters", response_model=AdapterList)
def list_adapters(
    db: DatabaseDep,
    runtime: RuntimeDep,
    limit: pagination.Limit = pagination.DEFAULT_LIMIT,
    cursor: pagination.CursorParam = None,
    view: pagination.View = "full",
    search: str | None = Query(
        None, alias="q", max_length=128, description="Only adapters whose name contains this."
    ),
    principal: Principal = ReadDep,
) -> AdapterList:
    """The tenant's adapters, oldest first, a page at a time (`next_cursor` leads on)."""
    drifting = runtime.metrics.is_drifting if runtime.metrics else None
    return adapter_page(db, principal.tenant_id, limit=limit, cursor=cursor, view=view,
                        search=search, drifting=drifting)  # fmt: skip


def adapter_page(
    db: Database,
    tenant_id: str,
    *,
    limit: int = pagination.DEFAULT_LIMIT,
    cursor: str | None = None,
    view: str = "full",
    search: str | None = None,
    drifting: Callable[[str], bool] | None = None,
) -> AdapterList:
    """One page of a tenant's adapters (what GET /v1/adapters answers)."""
    q = select(Adapter).where(Adapter.tenant_id == tenant_id)
    if search:  # a substring of the name, LIKE's wildcards taken literally
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        q = q.where(Adapter.name.ilike(f"%{escaped}%", escape="\\"))
    if cursor is not None:
        key = pagination.decode("adapters", cursor)
        q = q.where(pagination.after(Adapter.created_at, Adapter.id, key, newest_first=False))
    with db.session() as s:
        found = s.scalars(q.order_by(Adapter.created_at, Adapter.id).limit(limit + 1)).all()
        rows, next_cursor = pagination.cut("adapters", found, limit)
        by_adapter: dict[str, list[Version]] = {a.id: [] for a in rows}
        for i in range(0, len(rows), 500):  # one query per 500 adapters, not one each
            ids = [a.id for a in rows[i : i + 500]]
            for v in s.scalars(
                select(Version).where(Version.adapter_id.in_(ids)).order_by(Version.version)
            ):
                by_adapter[v.adapter_id].append(v)
        items: list[AdapterOut] | list[AdapterSummary]
        if view == "full":
            items = [adapter_out(s, a, by_adapter[a.id]) for a in rows]
        else:
            items = [adapter_summary(a, by_adapter[a.id], drifting) for a in rows]
        return AdapterList(adapters=items, next_cursor=next_cursor)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, dict | list)}


def adapter_summary(
    adapter: Adapter, versions: Sequence[Version], drifting: Callable[[str], bool] | None = None
) -> AdapterSummary:
    live = next((v for v in versions if v.version == adapter.live_version), None)
    return AdapterSummary(
        **_fields(adapter),
        drifting=bool(drifting and drifting(adapter.id)),
        version_count=len(versions),
        latest_version=versions[-1].version if versions else None,
        # The numbers only: per-class and per-group tables stay in the full view.
        live_metrics=scalar_metrics(live.metrics or {}) if live is not None else {},
    )


@router.get("/adapters/{adapter}", response_model=AdapterOut)
def get_adapter(adapter: str, db: DatabaseDep, principal: Principal = ReadDep) -> AdapterOut:
    with db.session() as s:
        return adapter_out(s, find_adapter(s, principal.tenant_id, adapter))


@router.delete("/adapters/{adapter}", status_code=204, response_class=Response)
def delete_adapter(
    adapter: str, runtime: ReadyRuntimeDep, principal: Principal = TrainDep
) -> Response:
    Control(runtime).delete(principal.tenant_id, adapter)
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
    raw = await _read_body(request)

    def retrain() -> AdapterAndJob:
        return _adapter_and_job(db, Control(runtime).retrain(principal.tenant_id, adapter, raw))

    return await run_in_threadpool(retrain)


@router.get("/adapters/{adapter}/versions/{version}", response_model=VersionOut)
def get_version(
    adapter: str, version: VersionPath, db: DatabaseDep, principal: Principal = ReadDep
) -> VersionOut:
    with db.session() as s:
        row = find_adapter(s, principal.tenant_id, adapter)
        return version_out(find_version(s, row, version), row.live_version)


@router.post("/adapters/{adapter}/versions/{version}/promote", response_model=AdapterOut)
def promote_version(
    adapter: str,
    version: VersionPath,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    principal: Principal = TrainDep,
) -> AdapterOut:
    """Make `version` live (also how to roll back). In-flight requests finish on the old one."""
    adapter_id = Control(runtime).promote(principal.tenant_id, adapter, version)
    with db.session() as s:
        return adapter_out(s, find_adapter(s, principal.tenant_id, adapter_id))


def _ready_version(
    db: Database, tenant_id: str, adapter: str, version: int | None, verb: str
) -> tuple[str, str, int]:
    """(artifact key, adapter name, version number) of a ready version (default: the live
    one); 404 or 409 naming what is missing."""
    with db.session() as s:
        row = find_adapter(s, tenant_id, adapter)
        number = version or row.live_version
        if number is None:
            raise NotFound(f"adapter {row.name!r} has no live version; pass ?version=N")
        ver = find_version(s, row, number)
        if ver.status != "ready" or not ver.artifact_key:
            raise Conflict(f"version {number} is {ver.status}; only ready versions can be {verb}")
        return ver.artifact_key, row.name, number


@router.get(
    "/adapters/{adapter}/export",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}},
)
def export_version(
    adapter: str,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    version: int | None = Query(
        None, ge=1, le=MAX_VERSION, description="Default: the live version."
    ),
    format: Literal["peft", "sentence-transformers"] = Query(
        "peft",
        description="peft: the LoRA adapter folder plus head (head-only for a probe); "
        "sentence-transformers: a full model with LoRA merged and the head as a Dense module.",
    ),
    principal: Principal = ReadDep,
) -> Response:
    """The version as files other tools load (see README, Exports), zipped in one folder."""
    key, name, number = _ready_version(db, principal.tenant_id, adapter, version, "exported")
    assert runtime.store is not None
    assert runtime.base is not None
    base = runtime.base
    try:
        model = load_adapter(runtime.store, key, base)
        files = export_files(
            model, base, format, name=name,
            base_model_id=runtime.settings.resolved_base_model_id(base.name),
        )  # fmt: skip
    except (StoreError, ArtifactError, ExportError) as e:
        raise Conflict(f"version {number} cannot be exported as {format}: {e}") from e
    folder = f"{name}-v{number}-{format}"
    return Response(
        zip_files(files, folder),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{folder}.zip"'},
    )


@router.get(
    "/adapters/{adapter}/download",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}},
)
def download_version(
    adapter: str,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    version: int | None = Query(
        None, ge=1, le=MAX_VERSION, description="Default: the live version."
    ),
    principal: Principal = ReadDep,
) -> Response:
    """A zip of the version's files: PEFT adapter, head, profile, loradock.json and manifest."""
    key, name, number = _ready_version(db, principal.tenant_id, adapter, version, "downloaded")
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
