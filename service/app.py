"""The app factory: `create_app(settings)` builds a FastAPI app around one Runtime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from prometheus_client import start_http_server

from loradock.adapters.serving.decode import GenerationEngine
from loradock.service.api import (
    adapters,
    batch,
    completions,
    embeddings,
    finetuning,
    health,
    jobs,
    monitoring,
    oip,
    predict,
    tenants,
)
from loradock.service.api.docs import install_docs
from loradock.service.batcher import MicroBatcher
from loradock.service.dataplane import DataPlane, LiveVersions
from loradock.service.errors import UnhandledErrorMiddleware, install_error_handlers
from loradock.service.metrics import GenerationMetrics, HTTPMetricsMiddleware, Metrics
from loradock.service.middleware import OverloadShedMiddleware, RequestBodyGuard
from loradock.service.observability import RequestContext
from loradock.service.runtime import Phase, Runtime
from loradock.service.settings import Settings
from loradock.service.ui import install_ui

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app. Nothing heavy happens here: the lifespan starts the Runtime.

    The server accepts connections at once (/healthz = 200, /readyz = 503) while a background thread
    opens the registry and loads the base model; /readyz turns 200 when that is done. If start-up
    fails, `on_fatal` is called (the CLI uses it to stop the server with a non-zero exit code).
    """
    runtime = Runtime(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                await asyncio.to_thread(runtime.start)
            except Exception as e:
                if on_fatal is not None:
                    on_fatal(e)
                return
            assert runtime.engine is not None
            assert runtime.db is not None
            s = runtime.settings
            batcher = MicroBatcher(
                runtime.engine,
                max_batch=s.max_batch_rows,
                max_batch_tokens=s.max_batch_tokens
                or (32768 if runtime.engine.base.device.type == "cuda" else 1024),
                max_wait_ms=s.max_wait_ms,
                max_queue=s.max_queue_rows,
                max_queue_wait_ms=s.max_queue_wait_ms,
                metrics=runtime.metrics,
            )
            batcher.start()
            generator = None
            base = runtime.engine.base
            if base.lm is not None:
                cuda = base.device.type == "cuda"
                generator = GenerationEngine(
                    base,
                    runtime.engine.pool,
                    gate=runtime.gate,
                    max_running=s.generation_max_running or (256 if cuda else 32),
                    kv_budget_tokens=s.generation_kv_budget_tokens or (262144 if cuda else 16384),
                    prefill_chunk=s.generation_prefill_chunk_tokens or (2048 if cuda else 256),
                    max_waiting=s.max_waiting_generations,
                    queue_timeout=s.generation_queue_seconds,
                    metrics=GenerationMetrics(runtime.metrics),
                )
            runtime.serving = DataPlane(
                runtime.engine,
                batcher,
                LiveVersions(runtime.db, s.live_poll_seconds),
                s,
                monitor=runtime.monitor,
                metrics=runtime.metrics,
                rate_limiter=runtime.rate_limiter,
                generator=generator,
            )

        metrics_server = None
        if settings.metrics_port is not None:
            # Its own listener (a thread-per-request WSGI server from prometheus_client), so a
            # NetworkPolicy can keep metrics internal while the API port is public.
            metrics_server, _ = start_http_server(
                settings.metrics_port, settings.metrics_host, registry=runtime.metrics.registry
            )
            app.state.metrics_port = metrics_server.server_port
            log.info("metrics on http://%s:%d/metrics", settings.metrics_host,
                     metrics_server.server_port)  # fmt: skip
        starting = asyncio.create_task(start(), name="loradock-start")
        app.state.start_task = starting
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            runtime.begin_drain()
            if not starting.done():
                # The loader thread cannot be interrupted; wait so we never close a DB in use.
                await asyncio.shield(starting)
            if runtime.serving is not None:
                await runtime.serving.batcher.stop()
                if runtime.serving.generator is not None:  # running streams finish first
                    await asyncio.to_thread(
                        runtime.serving.generator.close, settings.shutdown_grace_seconds
                    )
            runtime.stop()

    app = FastAPI(
        title="loradock",
        version=version("loradock"),
        summary="One frozen base transformer, many per-customer LoRA adapters.",
        lifespan=lifespan,
        docs_url=None,  # served offline by install_docs
        redoc_url=None,
        # FastAPI's native OpenTelemetry spans (inactive until LORADOCK_TRACING installs a
        # tracer provider); metrics are Prometheus's, and probes would only add noise.
        telemetry={
            "tracing": True,
            "operation_spans": True,
            "metrics": False,
            "logs": False,
            "auto_configure": False,
            "exclude": lambda scope: scope.get("path") in ("/healthz", "/readyz", "/metrics"),
        },
    )
    app.state.runtime = runtime
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(tenants.router)
    app.include_router(adapters.router)
    app.include_router(jobs.router)
    app.include_router(predict.router)
    app.include_router(embeddings.router)
    app.include_router(completions.router)
    app.include_router(finetuning.router)
    app.include_router(batch.router)
    app.include_router(oip.router)
    app.include_router(monitoring.router)
    install_docs(app)
    install_ui(app)
    _document_manual_bodies(app)
    # The last added is outermost: metrics see every answer, the size limit's 413s included.
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(
        RequestBodyGuard,
        max_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
        draining=lambda: runtime.phase is Phase.DRAINING,
    )
    app.add_middleware(
        OverloadShedMiddleware,
        batcher=lambda: runtime.serving.batcher if runtime.serving is not None else None,
        generator=lambda: runtime.serving.generator if runtime.serving is not None else None,
        metrics=runtime.metrics,
    )
    app.add_middleware(HTTPMetricsMiddleware, metrics=runtime.metrics)
    # Outermost: the request id and span cover everything, refusals at the door included.
    app.add_middleware(RequestContext, access=lambda: settings.access_log)
    return app


def _document_manual_bodies(app: FastAPI) -> None:
    """Routes that parse JSON or multipart themselves reference these schemas in OpenAPI."""
    from fastapi.openapi.utils import get_openapi

    from loradock.service.api.oip import InferRequest
    from loradock.service.api.schemas import AdapterCreate, VersionCreate

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (AdapterCreate, VersionCreate, InferRequest):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
