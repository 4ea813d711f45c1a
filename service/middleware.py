"""ASGI middleware that must run before any route: request body size limit."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loradock.service.errors import PROBLEM_BASE, PROBLEM_JSON


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
        import json

        is_oip = str(scope.get("path", "")).startswith("/v2")
        if is_oip:
            body = json.dumps({"error": detail}).encode()
            ctype = b"application/json"
        else:
            slug, title = (
                ("payload-too-large", "Payload too large")
                if status == 413
                else ("bad-request", "Bad request")
            )
            body = json.dumps(
                {
                    "type": PROBLEM_BASE + slug,
                    "title": title,
                    "status": status,
                    "detail": detail,
                    "instance": scope.get("path", ""),
                }
            ).encode()
            ctype = PROBLEM_JSON.encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", ctype),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
