"""The HTTP/1.1 connection guard: uvicorn's h11 protocol with the limits a public server needs.

uvicorn (0.55, h11) has a keep-alive timeout, but any byte cancels it, so a client that sends one
header line every few seconds holds a connection (and a file descriptor) forever. This protocol
adds a request-head deadline: the whole head (request line and headers) must arrive within
`header_timeout` seconds of the connection opening or of the previous response; otherwise the
server answers 408 and closes. It also refuses, from the raw head and with the reason, obsolete
line folding in headers (RFC 9112 5.2: "Transfer-Encoding:\\r\\n chunked" is one header to h11
and perhaps two to a proxy in front) and `Content-Length` together with `Transfer-Encoding`.

The body deadline and the size limit counted on the bytes actually received are ASGI middleware
(service/middleware.py, RequestBodyGuard), so they hold for every request on a connection,
pipelined ones included; it refuses CL with TE too, for heads this check did not see (pipelined
in one segment behind another request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_HEAD_LIMIT = 64 * 1024  # h11's default limit on an incomplete request head


def _head_problem(head: bytes) -> str | None:
    """Why a (possibly partial) request head must be refused, or None."""
    names = set()
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            return "obsolete line folding in a header is not accepted"
        names.add(line.split(b":", 1)[0].strip().lower())
    if b"content-length" in names and b"transfer-encoding" in names:
        return "a request may not carry both Content-Length and Transfer-Encoding"
    return None


class GuardedH11Protocol(H11Protocol):
    """H11Protocol plus a request-head deadline and a check of the raw head bytes."""

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True
        self._head = b""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._head = (self._head + data)[: _HEAD_LIMIT + 4]
            end = self._head.find(b"\r\n\r\n")
            problem = _head_problem(self._head if end < 0 else self._head[:end])
            if problem is not None:
                self._cancel_head_timer()
                log.info("refused a request head: %s", problem)
                self.send_400_response(problem)
                return
            if end >= 0:  # the head is complete: its deadline is met
                self._awaiting_head = False
                self._head = b""
                self._cancel_head_timer()
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._awaiting_head = True
            self._head = b""
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head:
            return
        if self._head:  # a client is sending, too slowly: tell it why before closing
            body = (
                f"request head not received within {self.header_timeout:g} s "
                "(setting LORADOCK_HEADER_TIMEOUT_SECONDS)\n"
            ).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                + body
            )  # fmt: skip
        if self.conn.our_state not in (h11.ERROR, h11.CLOSED):
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with the configured deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})
