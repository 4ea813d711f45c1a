"""Liveness, readiness and metrics: no authentication, cheap, never touch the model."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from loradock.service.api.deps import RuntimeDep
from loradock.service.errors import NotFound
from loradock.service.runtime import Phase

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 while the process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="200 once the base model is loaded and warmed up; 503 while loading or draining",
    responses={503: {"description": "starting, draining or failed"}},
)
def readyz(runtime: RuntimeDep) -> JSONResponse:
    body: dict[str, object] = {"status": runtime.phase.value}
    if runtime.phase is Phase.READY and runtime.base is not None:
        body["base_model"] = runtime.base.describe()
    if runtime.error:
        body["error"] = runtime.error
    status = 200 if runtime.phase is Phase.READY else 503
    if runtime.phase is Phase.READY:
        problem = runtime.check_registry()
        body["registry"] = problem or "ok"
        if problem is not None:  # every request would fail: take this replica out
            body["status"] = "registry-unavailable"
            status = 503
        if runtime.jobs is not None:
            body["jobs"] = runtime.jobs.health()
    waiting_helps = runtime.phase in (Phase.STARTING, Phase.DRAINING)
    headers = {"Retry-After": "5"} if status != 200 and waiting_helps else {}
    return JSONResponse(body, status_code=status, headers=headers)


@router.get("/metrics", summary="Prometheus text format", response_class=Response)
def metrics(runtime: RuntimeDep) -> Response:
    if runtime.settings.metrics_port is not None:
        raise NotFound("metrics are served on the internal metrics port (LORADOCK_METRICS_PORT)")
    body, content_type = runtime.metrics.render()
    return Response(body, media_type=content_type)
