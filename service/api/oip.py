"""Open Inference Protocol v2 (KServe) routes; model name = adapter id or name.

Same engine and batcher as /v1. Errors use the protocol's `{"error": "..."}` body (the error
handlers pick that format for every path under /v2).

The binary tensor data extension (what `tritonclient.http` uses by default) is supported both
ways: a request whose `Inference-Header-Content-Length` header says how long its JSON part is
carries the inputs marked `"parameters": {"binary_data_size": n}` after it, in input order
(BYTES as 4-byte little-endian lengths, each followed by its bytes); outputs are sent the same
way when the request asks for it (`"binary_data": true` on a requested output, or
`"binary_data_output": true` in the request's parameters), with the answer's JSON length in the
same header and `application/octet-stream` as its type.
"""

from __future__ import annotations

import json
import struct
from importlib.metadata import version as package_version
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as FastAPIPath
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from loradock.adapters.core.text import JSONError, parse_json
from loradock.service.api.deps import (
    DatabaseDep,
    Principal,
    ReadyRuntimeDep,
    RuntimeDep,
    require,
)
from loradock.service.api.schemas import MAX_VERSION
from loradock.service.db.models import Version
from loradock.service.db.registry import Database
from loradock.service.errors import BadRequest, LoradockError, Unprocessable
from loradock.service.lookup import find_adapter
from loradock.service.runtime import Phase

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
ReadDep = Depends(require("predict"))


HEADER_LENGTH = "Inference-Header-Content-Length"
# OIP datatypes of the tensors loradock sends and reads, as little-endian numpy types.
NUMPY_TYPES = {"BOOL": "|b1", "UINT8": "|u1", "INT8": "|i1", "INT16": "<i2", "INT32": "<i4",
               "INT64": "<i8", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2",
               "FP32": "<f4", "FP64": "<f8"}  # fmt: skip


class InferTensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(
        None, description="The elements (row-major); absent when sent as binary data."
    )
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


@router.get("/health/live")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
def ready(runtime: RuntimeDep) -> JSONResponse:
    ok = runtime.phase is Phase.READY and runtime.serving is not None
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("")
def server_metadata() -> dict[str, Any]:
    return {
        "name": "loradock",
        "version": package_version("loradock"),
        "extensions": ["binary_tensor_data"],
    }


VersionPath = Annotated[int, FastAPIPath(ge=1, le=MAX_VERSION)]


def _ready_versions(db: Database, tenant_id: str, model: str) -> list[str]:
    """The adapter's versions that can serve (trained and published), oldest first."""
    with db.session() as s:
        adapter = find_adapter(s, tenant_id, model)
        rows = s.scalars(
            select(Version.version)
            .where(Version.adapter_id == adapter.id, Version.status == "ready")
            .order_by(Version.version)
        ).all()
    return [str(v) for v in rows]


async def _metadata(
    model: str, version: int | None, runtime: Any, db: Database, principal: Principal
) -> dict[str, Any]:
    answer = await runtime.require_serving().task_of(principal.tenant_id, model, version)
    ref, task = answer.ref, answer.task
    outputs = [{k: v for k, v in o.items() if k != "data"} for o in task.output_tensors([])]
    versions = await run_in_threadpool(_ready_versions, db, principal.tenant_id, model)
    return {
        "name": ref.name,
        "versions": versions,
        "platform": "loradock",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": outputs,
        "parameters": {
            "adapter_id": ref.adapter_id,
            "labels": task.labels,
            "task": task.name,
            "version": str(ref.version),  # the one described: the live one, or the asked one
        },
    }


@router.get("/models/{model}")
async def model_metadata(
    model: str, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = ReadDep
) -> dict[str, Any]:
    """The live version's tensors; `versions` lists every version that can serve."""
    return await _metadata(model, None, runtime, db, principal)


@router.get("/models/{model}/versions/{version}")
async def model_version_metadata(
    model: str,
    version: VersionPath,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    principal: Principal = ReadDep,
) -> dict[str, Any]:
    return await _metadata(model, version, runtime, db, principal)


async def _ready(
    model: str, version: int | None, runtime: Any, principal: Principal
) -> JSONResponse:
    plane = runtime.require_serving()
    try:  # resolved and loaded: a version whose artifact is corrupt or missing is not ready
        answer = await plane.task_of(principal.tenant_id, model, version)
    except LoradockError as e:
        if e.status == 404:
            raise
        return JSONResponse({"name": model, "ready": False, "error": e.detail}, status_code=503)
    return JSONResponse({"name": answer.ref.name, "ready": True})


@router.get("/models/{model}/ready")
async def model_ready(
    model: str, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> JSONResponse:
    return await _ready(model, None, runtime, principal)


@router.get("/models/{model}/versions/{version}/ready")
async def model_version_ready(
    model: str, version: VersionPath, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> JSONResponse:
    return await _ready(model, version, runtime, principal)


def _texts(req: InferRequest) -> list[str]:
    if len(req.inputs) != 1 or req.inputs[0].name != "text":
        names = [t.name for t in req.inputs]
        raise BadRequest(f"expected exactly one input tensor named 'text', got {names}")
    t = req.inputs[0]
    if t.datatype != "BYTES":
        raise BadRequest(f"input 'text' must have datatype BYTES, got {t.datatype}")
    if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
        raise BadRequest(f"input 'text' must have shape [n] or [n, 1], got {t.shape}")
    data: list[Any] = []
    for item in t.data or []:  # flattened, or nested one level for shape [n, 1]
        data.extend(item if isinstance(item, list) else [item])
    if any(not isinstance(x, str) for x in data):
        raise BadRequest("input 'text' data must be strings")
    if len(data) != t.shape[0]:
        raise BadRequest(f"input 'text' has shape {t.shape} but {len(data)} elements")
    if not data:
        raise BadRequest("input 'text' is empty")
    return data


async def _infer(
    model: str, ver: int | None, req: InferRequest, runtime: ReadyRuntimeDep, principal: Principal
) -> Response:
    texts = _texts(req)
    plane = runtime.require_serving()
    try:
        answer = await plane.predict(principal.tenant_id, model, ver, texts, protocol="v2")
    except Unprocessable as e:  # the protocol answers bad inputs with 400
        raise BadRequest(e.detail) from e
    outputs = answer.task.output_tensors(answer.predictions)
    binary_all = bool((req.parameters or {}).get("binary_data_output"))
    binary = {o["name"] for o in outputs} if binary_all else set()
    if req.outputs:
        wanted = {o.name for o in req.outputs}
        unknown = wanted - {o["name"] for o in outputs}
        if unknown:
            raise BadRequest(f"unknown requested outputs {sorted(unknown)}")
        outputs = [o for o in outputs if o["name"] in wanted]
        binary = {
            o.name for o in req.outputs if (o.parameters or {}).get("binary_data", binary_all)
        }
    body: dict[str, Any] = {
        "model_name": answer.ref.name,
        "model_version": str(answer.ref.version),
        "outputs": outputs,
    }
    if req.id is not None:
        body["id"] = req.id
    if not binary:
        return JSONResponse(body)
    chunks = []
    for o in outputs:
        if o["name"] in binary:
            raw = encode_tensor(o["datatype"], o.pop("data"))
            o["parameters"] = {**o.get("parameters", {}), "binary_data_size": len(raw)}
            chunks.append(raw)
    header = json.dumps(body, separators=(",", ":")).encode()
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def encode_tensor(datatype: str, data: list[Any]) -> bytes:
    """Row-major elements in the binary tensor format."""
    if datatype == "BYTES":
        parts = []
        for x in data:
            raw = x if isinstance(x, bytes) else str(x).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.asarray(data, dtype=NUMPY_TYPES[datatype]).tobytes()


def decode_bytes_tensor(raw: bytes, name: str) -> list[str]:
    """A BYTES tensor's elements (UTF-8 text) from the binary format."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadRequest(f"input {name!r}: binary data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise BadRequest(f"input {name!r}: an element of {n} bytes runs past the data")
        try:
            out.append(raw[at : at + n].decode())
        except UnicodeDecodeError as e:
            raise BadRequest(f"input {name!r}: element {len(out)} is not UTF-8 text") from e
        at += n
    return out


async def _parse(request: Request) -> InferRequest:
    """The JSON body whatever its Content-Type (tritonclient does not always send one), and
    the inputs sent as binary data after it."""
    body = await request.body()
    binary = b""
    declared = request.headers.get(HEADER_LENGTH)
    if declared is not None:
        if not declared.isdigit() or int(declared) > len(body):
            raise BadRequest(
                f"{HEADER_LENGTH} is {declared!r}; it must be the length of the JSON part of "
                f"the body ({len(body)} bytes in all)"
            )
        body, binary = body[: int(declared)], body[int(declared) :]
    try:
        req = InferRequest.model_validate(parse_json(body))
    except JSONError as e:
        raise BadRequest(f"body is not valid JSON: {e}") from e
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise BadRequest(f"{where}: {err['msg']}") from e
    at = 0
    for t in req.inputs:
        size = (t.parameters or {}).get("binary_data_size")
        if size is None:
            if t.data is None:
                raise BadRequest(f"input {t.name!r} has neither data nor binary_data_size")
            continue
        if not isinstance(size, int) or size < 0 or at + size > len(binary):
            raise BadRequest(
                f"input {t.name!r}: binary_data_size {size!r} does not fit in the "
                f"{len(binary) - at} bytes of binary data left"
            )
        if t.datatype != "BYTES":
            raise BadRequest(f"input {t.name!r} must have datatype BYTES, got {t.datatype}")
        t.data = decode_bytes_tensor(binary[at : at + size], t.name)
        at += size
    if at != len(binary):
        raise BadRequest(f"{len(binary) - at} bytes of binary data belong to no input")
    return req


_INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}},
    }
}


@router.post("/models/{model}/infer", openapi_extra=_INFER_DOC)
async def infer(
    model: str, request: Request, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> Response:
    return await _infer(model, None, await _parse(request), runtime, principal)


@router.post("/models/{model}/versions/{version}/infer", openapi_extra=_INFER_DOC)
async def infer_version(
    model: str,
    version: VersionPath,
    request: Request,
    runtime: ReadyRuntimeDep,
    principal: Principal = ReadDep,
) -> Response:
    return await _infer(model, version, await _parse(request), runtime, principal)
