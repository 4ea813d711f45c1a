"""Open Inference Protocol v2 (KServe) routes; model name = adapter id or name.

Same engine and batcher as /v1. Errors use the protocol's `{"error": "..."}` body (the error
handlers pick that format for every path under /v2).
"""

from __future__ import annotations

import asyncio
import json
from importlib.metadata import version as package_version
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from loradock.service.api.deps import Principal, ReadyRuntimeDep, RuntimeDep, require
from loradock.service.api.predict import check_inputs
from loradock.service.db.models import Version
from loradock.service.errors import BadRequest, LoradockError
from loradock.service.runtime import Phase
from loradock.service.serving import Target

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


def _labels_of(runtime: ReadyRuntimeDep, target: Target) -> list[str]:
    assert runtime.db is not None
    with runtime.db.session() as s:
        ver = s.scalar(
            select(Version).where(
                Version.adapter_id == target.adapter_id, Version.version == target.version
            )
        )
        return list((ver.report or {}).get("labels", [])) if ver is not None else []


def _outputs_meta(task: str, labels: list[str]) -> list[dict[str, Any]]:
    if task == "regression":
        return [{"name": "value", "datatype": "FP32", "shape": [-1]}]
    return [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "scores", "datatype": "FP32", "shape": [-1, len(labels)]},
    ]


async def _resolve(runtime: ReadyRuntimeDep, principal: Principal, model: str, ver: int | None):
    serving = runtime.require_serving()
    return serving, await asyncio.to_thread(serving.live.resolve, principal.tenant_id, model, ver)


@router.get("/models/{model}")
async def model_metadata(
    model: str, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> dict[str, Any]:
    _, target = await _resolve(runtime, principal, model, None)
    labels = await asyncio.to_thread(_labels_of, runtime, target)
    return {
        "name": target.name,
        "versions": [str(target.version)],
        "platform": "loradock",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": _outputs_meta(target.task, labels),
        "parameters": {"adapter_id": target.adapter_id, "labels": labels, "task": target.task},
    }


@router.get("/models/{model}/ready")
async def model_ready(
    model: str, runtime: ReadyRuntimeDep, principal: Principal = ReadDep
) -> JSONResponse:
    try:
        _, target = await _resolve(runtime, principal, model, None)
    except LoradockError as e:
        if e.status == 404:
            raise
        return JSONResponse({"name": model, "ready": False, "error": e.detail}, status_code=503)
    return JSONResponse({"name": target.name, "ready": True})


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
    with runtime.metrics_for("v2", len(req.inputs[0].data) if req.inputs else 0):
        runtime.rate_limiter.take(principal.tenant_id)
        texts = _texts(req)
        try:
            check_inputs(runtime, texts)
        except LoradockError as e:
            raise BadRequest(e.detail) from e
        serving, target = await _resolve(runtime, principal, model, ver)
        results = await serving.predict(target, texts)
    n = len(results)
    if target.task == "regression":
        outputs = [
            {"name": "value", "datatype": "FP32", "shape": [n],
             "data": [r.output["value"] for r in results]},
        ]  # fmt: skip
    else:
        labels = list(results[0].output["scores"]) if results else []
        outputs = [
            {"name": "label", "datatype": "BYTES", "shape": [n],
             "data": [r.output["label"] for r in results]},
            {"name": "scores", "datatype": "FP32", "shape": [n, len(labels)],
             "data": [r.output["scores"][lbl] for r in results for lbl in labels]},
        ]  # fmt: skip
    if req.outputs:
        wanted = {o.name for o in req.outputs}
        unknown = wanted - {o["name"] for o in outputs}
        if unknown:
            raise BadRequest(f"unknown requested outputs {sorted(unknown)}")
        outputs = [o for o in outputs if o["name"] in wanted]
    body: dict[str, Any] = {
        "model_name": target.name,
        "model_version": str(target.version),
        "outputs": outputs,
    }
    if req.id is not None:
        body["id"] = req.id
    return body


async def _parse(request: Request) -> InferRequest:
    """The JSON body whatever its Content-Type (tritonclient does not always send one)."""
    try:
        return InferRequest.model_validate(json.loads(await request.body()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
    version: int,
    request: Request,
    runtime: ReadyRuntimeDep,
    principal: Principal = ReadDep,
) -> dict[str, Any]:
    return await _infer(model, version, await _parse(request), runtime, principal)
