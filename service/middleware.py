"""ASGI middleware that must run before any route: request body size limit, overload shedding."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loradock.service.batcher import MicroBatcher
from loradock.service.errors import PROBLEM_BASE, PROBLEM_JSON
from loradock.service.metrics import Metrics

_PREDICT = re.compile(r"^/v1/adapters/[^/]+/predict$|^/v2/models/[^/]+(/versions/[^/]+)?/infer$")


async def send_problem(
    scope: Scope,
    send: Send,
    status: int,
    slug: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    keep_alive: bool = False,
) -> None:
    """An error answered before routing: problem+json, or `{"error"}` on the OIP routes.
    The connection is closed unless `keep_alive` (only when the request body was read)."""
    if str(scope.get("path", "")).startswith("/v2"):
        body = json.dumps({"error": detail}).encode()
        ctype = b"application/json"
    else:
        problem = {
            "type": PROBLEM_BASE + slug,
            "title": title,
            "status": status,
            "detail": detail,
            "instance": scope.get("path", ""),
        }
        body = json.dumps(problem).encode()
        ctype = PROBLEM_JSON.encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", ctype),
                (b"content-length", str(len(body)).encode()),
                *([] if keep_alive else [(b"connection", b"close")]),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


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
            wait = batcher.expected_wait() if batcher is not None else None
            if batcher is not None and wait is not None and 0 < batcher.max_queue_wait < wait:
                if self.metrics is not None:
                    protocol = "v2" if path.startswith("/v2") else "v1"
                    self.metrics.predict_failures.labels(protocol, "overloaded").inc()
                await send_problem(
                    scope, send, 429, "too-many-requests", "Too many requests",
                    f"the server is at capacity: about {wait:.1f} s of work is queued, more "
                    f"than the {batcher.max_queue_wait:.1f} s allowed "
                    "(setting LORADOCK_MAX_QUEUE_WAIT_MS); retry later",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                    keep_alive=await _drain(receive),
                )  # fmt: skip
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
                await self._reject(scope, send, 400, "Content-Length is not a number")
                return
            if length > self.max_bytes:
                await self._too_large(scope, send, f"{length} bytes")
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
                await self._too_large(scope, send, f"more than {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send, size: str) -> None:
        await self._reject(
            scope, send, 413,
            f"request body of {size} exceeds the limit of {self.max_bytes} bytes "
            "(setting LORADOCK_MAX_BODY_BYTES)",
        )  # fmt: skip

    async def _reject(self, scope: Scope, send: Send, status: int, detail: str) -> None:
        slug, title = (
            ("payload-too-large", "Payload too large")
            if status == 413
            else ("bad-request", "Bad request")
        )
        await send_problem(scope, send, status, slug, title, detail)
