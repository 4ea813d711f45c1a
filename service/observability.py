"""Logs and traces: one log format for loradock and uvicorn, a request id on every request, and
OpenTelemetry spans when tracing is configured.

- **Logs.** `logging_config(level, fmt)` is a `logging.config.dictConfig` that the CLI applies
  and hands to uvicorn, so loradock's records and uvicorn's share one handler and one format:
  one JSON object per line (`time`, `level`, `logger`, `message`, `request_id` when there is
  one, and the record's `extra` fields), or plain text (setting LORADOCK_LOG_FORMAT).
- **Request ids.** `RequestContext` is the outermost middleware. It takes the caller's
  `X-Request-ID` when it is a sane token (1-128 characters of `[A-Za-z0-9._:/+=@-]`, what
  proxies and load balancers send), else makes one; the id is echoed in the response's
  `X-Request-ID` header, put in problem+json bodies (`request_id`), set on every log record
  written while the request runs, and carried into the micro-batch that serves the request
  (its debug line lists the ids it served). The access line (logger `loradock.access`) is
  written here, after the response, with the status, duration and tenant.
- **Traces.** Off by default. With LORADOCK_TRACING=otlp, `configure_tracing` installs an SDK
  tracer provider exporting over OTLP/HTTP (endpoint and headers from the standard
  `OTEL_EXPORTER_OTLP_*` variables, service name from `OTEL_SERVICE_NAME`, default
  "loradock"). Spans: FastAPI's own per request (its native OpenTelemetry support: a W3C
  `traceparent` continues the caller's trace; with spans for dependencies, the endpoint and
  serialization), named here with `loradock.request_id` and `loradock.tenant_id`; one per
  micro-batch (linked to the requests it serves), one per forward pass, one per prefill and
  decode step of generation, one per training step.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
_HEADER = HEADER.lower().encode()
_VALID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_NO_STORE = (b"cache-control", b"no-store")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "loradock_request_id", default=None
)
access_log = logging.getLogger("loradock.access")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id",
                                                    "color_message", "taskName"}  # fmt: skip


def current_request_id() -> str | None:
    return request_id.get()


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on each record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """`time level logger [request id]: message`, the request id only inside a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        return super().format(record)


def logging_config(level: str, fmt: Literal["json", "plain"]) -> dict[str, Any]:
    """The dictConfig for loradock and uvicorn (uvicorn's own access log is off: the access
    line is RequestContext's, which knows the request id, the tenant and the duration)."""
    formatter = JSONFormatter if fmt == "json" else PlainFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": {"()": formatter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            # uvicorn's loggers pass their records to the root handler, like everyone's.
            **{
                name: {"handlers": [], "level": level.upper(), "propagate": True}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
            },
            # A line per Alembic plugin at every start says nothing (migrations still log).
            "alembic.runtime.plugins": {"level": "WARNING"},
        },
    }


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestContext:
    """Outermost middleware: request id, the request's span, and the access line."""

    def __init__(self, app: ASGIApp, access: Callable[[], bool] = lambda: True) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope.get("headers") or []:
            if name == _HEADER:
                text = value.decode("latin-1").strip()
                rid = text if _VALID.fullmatch(text) else None
        rid = rid or new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id.set(rid)
        method = scope.get("method", "")
        api = str(scope.get("path", "")).startswith(("/v1/", "/v2/"))
        status = 500
        started = time.perf_counter()

        # The server span is FastAPI's own (its native OpenTelemetry support, on once a tracer
        # provider is installed; it continues a caller's `traceparent`), kept in the scope
        # rather than made current: this names it with the request id and the tenant.
        span = getattr(scope.get("fastapi.telemetry"), "span", None) or trace.get_current_span()
        if span.is_recording():
            span.set_attribute("loradock.request_id", rid)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != _HEADER]
                headers.append((_HEADER, rid.encode()))
                if api and not any(k == b"cache-control" for k, _ in headers):
                    headers.append(_NO_STORE)  # tenant data: never kept by a browser or proxy
                message = {**message, "headers": headers}
                tenant = scope.get("state", {}).get("tenant_id")
                if tenant and span.is_recording():  # before the span ends with the response
                    span.set_attribute("loradock.tenant_id", tenant)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access():
                tenant = scope.get("state", {}).get("tenant_id")
                _log_access(scope, method, status, time.perf_counter() - started, tenant)
            request_id.reset(token)


def _log_access(scope: Scope, method: str, status: int, seconds: float, tenant: Any) -> None:
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "-"
    path = scope.get("path", "")
    query = scope.get("query_string", b"")
    target = path + ("?" + query.decode("latin-1") if query else "")
    ms = round(seconds * 1000, 2)
    access_log.info(
        '%s "%s %s HTTP/%s" %d %.2fms',
        peer,
        method,
        target,
        scope.get("http_version", "1.1"),
        status,
        ms,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": ms,
            "client": peer,
            "tenant_id": tenant,
        },
    )


# --- tracing -------------------------------------------------------------------------------------


class TracingError(RuntimeError):
    pass


def configure_tracing(mode: str, sample_ratio: float) -> Callable[[], None] | None:
    """Install an OTLP-exporting tracer provider when `mode` is "otlp"; returns its shutdown
    (which flushes the spans still queued), or None when tracing is off."""
    if mode == "off":
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as e:
        raise TracingError(
            f"LORADOCK_TRACING={mode} needs the OpenTelemetry SDK and OTLP exporter ({e.name} "
            "is missing): pip install 'loradock[tracing]'"
        ) from e
    import os

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", "loradock")})
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio))
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider.shutdown
