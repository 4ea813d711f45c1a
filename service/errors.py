"""Typed errors with a status, turned into responses in exactly one place.

Routes under /v1 (and everything else) answer RFC 9457 `application/problem+json`; the Open
Inference Protocol routes under /v2 answer that protocol's `{"error": "..."}`. No response ever
carries a stack trace or an internal path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


_STATUS_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
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
        status = 400 if _is_oip(request) else 422
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
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            request, 500, "Internal error", "an internal error occurred; it has been logged",
            slug="internal",
        )  # fmt: skip
