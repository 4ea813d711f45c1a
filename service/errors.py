"""Typed errors with a status, turned into responses in exactly one place.

Routes under /v1 (and everything else) answer RFC 9457 `application/problem+json`; the Open
Inference Protocol routes under /v2 answer that protocol's `{"error": "..."}`. No response ever
carries a stack trace or an internal path.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loradock.service.observability import current_request_id

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "urn:loradock:problem:"


class LoradockError(Exception):
    """Base of every error a client may see. Subclasses fix the status and the problem type."""

    status: int = 500
    slug: str = "internal"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}


class BadRequest(LoradockError):
    status, slug, title = 400, "bad-request", "Bad request"


class Unauthorized(LoradockError):
    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="loradock"'})


class Forbidden(LoradockError):
    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(LoradockError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(LoradockError):
    status, slug, title = 409, "conflict", "Conflict"


class RequestTimeout(LoradockError):
    status, slug, title = 408, "request-timeout", "Request timeout"


class InsufficientStorage(LoradockError):
    status, slug, title = 507, "insufficient-storage", "Insufficient storage"


class PayloadTooLarge(LoradockError):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class Unprocessable(LoradockError):
    status, slug, title = 422, "validation-error", "Invalid request"


class TooManyRequests(LoradockError):
    status, slug, title = 429, "too-many-requests", "Too many requests"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class NotReady(LoradockError):
    status, slug, title = 503, "not-ready", "Service not ready"

    def __init__(self, detail: str, *, retry_after: int | None = 5) -> None:
        """retry_after None: no Retry-After, waiting will not help (e.g. a failed start)."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        super().__init__(detail, headers=headers)


def _is_oip(request: Request) -> bool:
    return request.url.path == "/v2" or request.url.path.startswith("/v2/")


OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/files",
                "/v1/fine_tuning/jobs")  # fmt: skip
OPENAI_PREFIXES = ("/v1/models/", "/v1/files/", "/v1/fine_tuning/")


def is_openai(request: Request) -> bool:
    """Routes that answer errors in OpenAI's shape (the `openai` client parses it)."""
    path = request.url.path.rstrip("/")
    return path in OPENAI_PATHS or path.startswith(OPENAI_PREFIXES)


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """`{"error": {"message", "type", "param", "code"}}`, OpenAI's error body."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(
    request: Request,
    status: int,
    title: str,
    detail: str,
    *,
    slug: str,
    headers: Mapping[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    if _is_oip(request):
        return JSONResponse({"error": detail}, status_code=status, headers=headers)
    if is_openai(request):
        extra = extra or {}
        param = extra.get("param")
        if param is None and extra.get("errors"):  # a validation error: the first field's name
            loc = [p for p in extra["errors"][0].get("loc", []) if p != "body"]
            param = ".".join(loc) or None
        return openai_error(status, detail, param=param, code=extra.get("code") or slug,
                            headers=headers)  # fmt: skip
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    rid = current_request_id()
    if rid is not None:
        body["request_id"] = rid  # also in the X-Request-ID header: quote it when reporting
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what it wraps (a SQLAlchemy error's DBAPI error) and its causes."""
    out: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is seen for seen in out) or len(out) > 20:
            continue
        out.append(e)
        orig = getattr(e, "orig", None)
        todo += [e.__cause__, e.__context__, orig if isinstance(orig, BaseException) else None]
    return out


def storage_problem(exc: BaseException) -> str | None:
    """ "the server's disk is full" when that is what `exc` comes down to, else None: ENOSPC or
    EDQUOT from the file system, SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100)."""
    for e in _chain(exc):
        message = str(e).lower()
        if (
            (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
            or getattr(e, "sqlstate", None) == "53100"
            or "database or disk is full" in message
            or "no space left on device" in message
        ):
            return "the server's disk is full"
    return None


def registry_problem(exc: BaseException) -> str | None:
    """A description when `exc` says the registry database is missing or unreadable."""
    for e in _chain(exc):
        message = str(e).lower()
        if "no such table" in message or "unable to open database file" in message:
            return "the registry database is missing or unreadable"
        if type(e).__name__ == "OperationalError" and "connection" in message:
            return "the registry database cannot be reached"
    return None


def describe_failure(exc: BaseException) -> str:
    """A short operator-facing description, with no paths or credentials in it."""
    return storage_problem(exc) or registry_problem(exc) or f"unexpected {type(exc).__name__}"


def job_failure_message(exc: BaseException) -> str:
    """What a tenant reads when its job failed on the server's side: what happened and what to
    do, never "see the log" (a tenant cannot read it)."""
    cause = storage_problem(exc) or registry_problem(exc)
    if cause is not None:
        return f"{cause} (a server-side problem, not your data); submit the job again later"
    return (
        f"the server failed while training ({type(exc).__name__}), not because of your data; "
        "submit the job again, and report its id to the operator if it fails again"
    )


_STATUS_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    408: ("request-timeout", "Request timeout"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-error", "Invalid request"),
    429: ("too-many-requests", "Too many requests"),
    503: ("not-ready", "Service not ready"),
}


def _validation_detail(errors: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    items = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        items.append({"loc": loc, "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    first = items[0] if items else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"]) or "body"
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return f"{where}: {first['msg']}{more}", items


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoradockError)
    async def _loradock(request: Request, exc: LoradockError) -> JSONResponse:
        return error_response(
            request,
            exc.status,
            exc.title,
            exc.detail,
            slug=exc.slug,
            headers=exc.headers,
            extra=exc.extra,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, items = _validation_detail(list(exc.errors()))
        status = 400 if _is_oip(request) or is_openai(request) else 422
        return error_response(
            request, status, "Invalid request", detail, slug="validation-error",
            extra={"errors": items},
        )  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug, title = _STATUS_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        return error_response(
            request, exc.status_code, title, detail, slug=slug, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only what escapes UnhandledErrorMiddleware (the outer middleware) gets here.
        return unexpected_error_response(request, exc)


def unexpected_error_response(request: Request, exc: BaseException) -> JSONResponse:
    """The answer to an exception no route turned into a LoradockError: 507 when the disk is
    full, 503 when the registry is away, else a 500 that says nothing of the internals (the
    traceback goes to the log, once)."""
    storage = storage_problem(exc)
    if storage is not None:  # the operator's problem, reported as such: 507 with the cause
        log.error("%s %s: %s", request.method, request.url.path, storage)
        return error_response(
            request, 507, InsufficientStorage.title,
            f"{storage}: nothing was changed; retry when space has been freed",
            slug=InsufficientStorage.slug, headers={"Retry-After": "60"},
        )  # fmt: skip
    if any(isinstance(e, StaleDataError) for e in _chain(exc)):
        # SQLAlchemy: the row changed or vanished under this request (a promote racing a delete)
        return error_response(
            request, 409, "Conflict",
            "the object was changed or deleted by a concurrent request; read it again",
            slug="conflict",
        )  # fmt: skip
    registry = registry_problem(exc)
    if registry is not None:
        log.error("%s %s: %s", request.method, request.url.path, registry)
        return error_response(
            request, 503, "Service unavailable", f"{registry}; retry later",
            slug="registry-unavailable", headers={"Retry-After": "5"},
        )  # fmt: skip
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        request, 500, "Internal error", "an internal error occurred; it has been logged",
        slug="internal",
    )  # fmt: skip


class UnhandledErrorMiddleware:
    """Turns an exception that escaped every route into `unexpected_error_response`, inside the
    app. (Starlette's own catch-all answers too, but then re-raises, so the server also logs a
    second traceback and drops the client's keep-alive connection.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            if started:  # part of an answer is out: nothing sensible can follow it
                raise
            response = unexpected_error_response(Request(scope), exc)
            await response(scope, receive, send)
