"""Open Inference Protocol v2 (KServe) routes; model name = adapter id or name.

Same engine and batcher as /v1. Errors use the protocol's `{"error": "..."}` body (the error
handlers pick that format for every path under /v2).
"""

from __future__ import annotations

from importlib.metadata import version as package_version
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as FastAPIPath
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loradock.adapters.core.text import JSONError, parse_json
from loradock.service.api.deps import Principal, ReadyRuntimeDep, RuntimeDep, require
from loradock.service.api.schemas import MAX_VERSION
from loradock.service.errors import BadRequest, LoradockError, Unprocessable
from loradock.service.runtime import Phase

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
ReadDep = Depends(require("predict"))


class InferTensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str


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
    return {"name": "loradock", "version": package_version("loradock"), "extensions": []}


@router.get("/models/{model}")
async def model_metadata(
    model: str, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> dict[str, Any]:
    answer = await runtime.require_serving().task_of(principal.tenant_id, model, None)
    ref, task = answer.ref, answer.task
    outputs = [{k: v for k, v in o.items() if k != "data"} for o in task.output_tensors([])]
    return {
        "name": ref.name,
        "versions": [str(ref.version)],
        "platform": "loradock",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": outputs,
        "parameters": {"adapter_id": ref.adapter_id, "labels": task.labels, "task": task.name},
    }


@router.get("/models/{model}/ready")
async def model_ready(
    model: str, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> JSONResponse:
    plane = runtime.require_serving()
    try:  # resolved and loaded: a live version whose artifact is corrupt or missing is not ready
        answer = await plane.task_of(principal.tenant_id, model, None)
    except LoradockError as e:
        if e.status == 404:
            raise
        return JSONResponse({"name": model, "ready": False, "error": e.detail}, status_code=503)
    return JSONResponse({"name": answer.ref.name, "ready": True})


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
    for item in t.data:  # flattened, or nested one level for shape [n, 1]
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
) -> dict[str, Any]:
    texts = _texts(req)
    plane = runtime.require_serving()
    try:
        answer = await plane.predict(principal.tenant_id, model, ver, texts, protocol="v2")
    except Unprocessable as e:  # the protocol answers bad inputs with 400
        raise BadRequest(e.detail) from e
    outputs = answer.task.output_tensors(answer.predictions)
    if req.outputs:
        wanted = {o.name for o in req.outputs}
        unknown = wanted - {o["name"] for o in outputs}
        if unknown:
            raise BadRequest(f"unknown requested outputs {sorted(unknown)}")
        outputs = [o for o in outputs if o["name"] in wanted]
    body: dict[str, Any] = {
        "model_name": answer.ref.name,
        "model_version": str(answer.ref.version),
        "outputs": outputs,
    }
    if req.id is not None:
        body["id"] = req.id
    return body


async def _parse(request: Request) -> InferRequest:
    """The JSON body whatever its Content-Type (tritonclient does not always send one)."""
    try:
        return InferRequest.model_validate(parse_json(await request.body()))
    except JSONError as e:
        raise BadRequest(f"body is not valid JSON: {e}") from e
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise BadRequest(f"{where}: {err['msg']}") from e


_INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}},
    }
}


@router.post("/models/{model}/infer", openapi_extra=_INFER_DOC)
async def infer(
    model: str, request: Request, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> dict[str, Any]:
    return await _infer(model, None, await _parse(request), runtime, principal)


@router.post("/models/{model}/versions/{version}/infer", openapi_extra=_INFER_DOC)
async def infer_version(
    model: str,
    version: Annotated[int, FastAPIPath(ge=1, le=MAX_VERSION)],
    request: Request,
    runtime: ReadyRuntimeDep,
    principal: Principal = ReadDep,
) -> dict[str, Any]:
    return await _infer(model, version, await _parse(request), runtime, principal)
