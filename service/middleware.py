"""ASGI middleware that must run before any route: request body size limit, overload shedding."""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loradock.service.batcher import MicroBatcher
from loradock.service.errors import BadRequest, LoradockError, PayloadTooLarge, error_response
from loradock.service.metrics import Metrics

_PREDICT = re.compile(r"^/v1/adapters/[^/]+/predict$|^/v2/models/[^/]+(/versions/[^/]+)?/infer$")


async def send_error(
    scope: Scope, receive: Receive, send: Send, error: LoradockError, *, keep_alive: bool = False
) -> None:
    """An error answered before routing, rendered like every other (problem+json, `{"error"}`
    on the OIP routes). The connection is closed unless `keep_alive` (the body was read)."""
    headers = dict(error.headers)
    if not keep_alive:
        headers["Connection"] = "close"
    response = error_response(
        Request(scope),
        error.status,
        error.title,
        error.detail,
        slug=error.slug,
        headers=headers,
        extra=error.extra,
    )
    await response(scope, receive, send)


async def _drain(receive: Receive, limit: int = 1 << 20) -> bool:
    """Read and drop a request body of at most `limit` bytes; False if it was longer (or the
    client went away), in which case the connection must close."""
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        total += len(message.get("body", b""))
        if total > limit:
            return False
        if not message.get("more_body", False):
            return True


class OverloadShedMiddleware:
    """Refuse predict requests with 429 at the door while the batcher is over its wait limit.

    Under a surge most requests must be refused, so refusing has to be nearly free: this check
    runs before authentication, body parsing and any database access (it reveals nothing but
    "busy"). The batcher's own admission check, after parsing, stays the exact one; this one
    only fires when the queue already holds more than `max_queue_wait` of work.
    """

    def __init__(
        self,
        app: ASGIApp,
        batcher: Callable[[], MicroBatcher | None],
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.batcher = batcher
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            path = str(scope.get("path", ""))
            batcher = self.batcher() if _PREDICT.match(path) else None
            overloaded = batcher.over_wait_limit() if batcher is not None else None
            if overloaded is not None:
                if self.metrics is not None:
                    protocol = "v2" if path.startswith("/v2") else "v1"
                    self.metrics.predict_failures.labels(protocol, "overloaded").inc()
                keep_alive = await _drain(receive)
                await send_error(scope, receive, send, overloaded, keep_alive=keep_alive)
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answer 413 for bodies over `max_bytes`, before a route parses (or buffers) them.

    A declared Content-Length is checked up front. A chunked body is read up to the limit and
    replayed to the app, so the limit holds even when the client sends no length.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_error(scope, receive, send, BadRequest("Content-Length is not a number"))
                return
            if length > self.max_bytes:
                await self._too_large(scope, receive, send, f"{length} bytes")
                return
            await self.app(scope, receive, send)
            return
        # No declared length: buffer up to the limit, then replay.
        messages: list[Message] = []
        total = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await self._too_large(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        detail = (
            f"request body of {size} exceeds the limit of {self.max_bytes} bytes "
            "(setting LORADOCK_MAX_BODY_BYTES)"
        )
        await send_error(scope, receive, send, PayloadTooLarge(detail))
