"""ASGI middleware that must run before any route: the request body guard, overload shedding."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loradock.adapters.serving.decode import GenerationEngine
from loradock.service.batcher import MicroBatcher
from loradock.service.errors import (
    BadRequest,
    LoradockError,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    error_response,
)
from loradock.service.metrics import Metrics

_PREDICT = re.compile(r"^/v1/adapters/[^/]+/predict$|^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
_GENERATE = re.compile(r"^/v1/(chat/)?completions/?$")


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
    """Refuse predict requests with 429 at the door while their tenant is over the wait limit.

    Under a surge most requests must be refused, so refusing has to be nearly free: this check
    runs before authentication, body parsing and any database access (it reveals nothing but
    "busy"). The batcher shares passes fairly across tenants, so the wait depends on whose
    request it is: the tenant behind an Authorization header is remembered from that header's
    earlier requests (a bounded map of header digests), and an unknown header is judged as a new
    tenant. The batcher's own admission check, after parsing, stays the exact one.
    """

    MAX_FLOWS = 10_000

    def __init__(
        self,
        app: ASGIApp,
        batcher: Callable[[], MicroBatcher | None],
        metrics: Metrics | None = None,
        generator: Callable[[], GenerationEngine | None] | None = None,
    ) -> None:
        self.app = app
        self.batcher = batcher
        self.generator = generator or (lambda: None)
        self.metrics = metrics
        self._flows: OrderedDict[bytes, str] = OrderedDict()  # header digest -> tenant id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            path = str(scope.get("path", ""))
            generator = self.generator() if _GENERATE.match(path) else None
            if generator is not None and generator.waiting() >= generator.max_waiting:
                # The generation queue is full: refused before the body is even parsed.
                if self.metrics is not None:
                    protocol = "chat" if "chat" in path else "completions"
                    self.metrics.predict_failures.labels(protocol, "overloaded").inc()
                keep_alive = await _drain(receive)
                busy = TooManyRequests(
                    f"{generator.waiting()} generations are already waiting for the decode "
                    "batch (setting LORADOCK_MAX_WAITING_GENERATIONS); retry shortly",
                    retry_after=1,
                )
                await send_error(scope, receive, send, busy, keep_alive=keep_alive)
                return
            batcher = self.batcher() if _PREDICT.match(path) else None
            if batcher is None:
                await self.app(scope, receive, send)
                return
            flow = _flow(scope)
            overloaded = batcher.over_wait_limit(tenant=self._flows.get(flow))
            if overloaded is not None:
                if self.metrics is not None:
                    protocol = "v2" if path.startswith("/v2") else "v1"
                    self.metrics.predict_failures.labels(protocol, "overloaded").inc()
                keep_alive = await _drain(receive)
                await send_error(scope, receive, send, overloaded, keep_alive=keep_alive)
                return
            await self.app(scope, receive, send)
            tenant = scope.get("state", {}).get("tenant_id")
            if tenant is not None:
                self._flows[flow] = tenant
                self._flows.move_to_end(flow)
                while len(self._flows) > self.MAX_FLOWS:
                    self._flows.popitem(last=False)
            return
        await self.app(scope, receive, send)


def _flow(scope: Scope) -> bytes:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            return hashlib.blake2b(value, digest_size=16).digest()
    return b""


class RequestBodyGuard:
    """Every request body is read here, under limits, before any route sees it.

    - `Content-Length` together with `Transfer-Encoding` is refused with 400 before a byte of the
      body is read (request smuggling: h11 believes the chunked framing, a proxy may not).
    - The size limit counts the bytes actually received, whatever the headers say: a declared
      length over the limit is refused at once (413), and any body is read only up to the limit.
    - The whole body must arrive within `body_timeout` seconds (408 otherwise), so a client
      trickling a byte at a time cannot hold a connection; the route then parses from memory.
    - Once the server drains, every response says `Connection: close`, so keep-alive clients
      reconnect elsewhere instead of meeting a closed socket with their next request.

    Every refusal here closes the connection: what follows on it cannot be trusted.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        body_timeout: float = 60.0,
        draining: Callable[[], bool] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout
        self.draining = draining or (lambda: False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining():
            send = _closing(send)
        headers = scope.get("headers") or []
        declared = [v for k, v in headers if k == b"content-length"]
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        if declared and chunked:
            await send_error(scope, receive, send, BadRequest(
                "a request may not carry both Content-Length and Transfer-Encoding"
            ))  # fmt: skip
            return
        if declared:
            try:
                length = int(declared[0])
            except ValueError:
                await send_error(scope, receive, send, BadRequest("Content-Length is not a number"))
                return
            if length > self.max_bytes:
                await self._too_large(scope, receive, send, f"{length} bytes")
                return
        elif not chunked:  # no body at all
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        total = 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                await send_error(scope, receive, send, RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout:g} s "
                    "(setting LORADOCK_BODY_TIMEOUT_SECONDS)"
                ))  # fmt: skip
                return
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await self._too_large(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        if len(messages) > 1 and messages[-1]["type"] == "http.request":
            # one message: routes read it at once, and the parts are freed with it
            body = b"".join(m.get("body", b"") for m in messages)
            messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        detail = (
            f"request body of {size} exceeds the limit of {self.max_bytes} bytes "
            "(setting LORADOCK_MAX_BODY_BYTES)"
        )
        await send_error(scope, receive, send, PayloadTooLarge(detail))


def _closing(send: Send) -> Send:
    """`send` with `Connection: close` added to the response head."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return wrapped
