"""A real HTTP server on a free loopback port that answers from a script (client unit tests).

Each route (method, path without query) has a queue of `Reply`s; the last one repeats. Every
request is recorded with its arrival time, so tests can check what the client sent and when.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list: JSON; str: text; bytes: as is
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    drop: bool = False  # close the connection without answering
    events: list[tuple[str, dict]] | None = None  # server-sent events, then the stream ends
    break_stream: bool = False  # with events: promise more body than sent, then hang up
    delay: float = 0.0  # seconds before answering
    # The body from the request; a (status, body) pair sets the status too.
    compute: Callable[[Recorded], Any] | None = None


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, tuple[str | None, bytes, str]]:
        """Multipart fields: name -> (filename, content, content type)."""
        ctype = self.headers["content-type"]
        raw = f"Content-Type: {ctype}\r\n\r\n".encode() + self.body
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
        out = {}
        for part in msg.iter_parts():  # type: ignore[attr-defined]
            name = part.get_param("name", header="content-disposition")
            out[name] = (
                part.get_filename(),
                part.get_payload(decode=True),
                part.get_content_type(),
            )
        return out


def problem(status: int, detail: str, **extra: Any) -> dict[str, Any]:
    titles = {
        401: "Unauthorized",
        404: "Not found",
        409: "Conflict",
        422: "Invalid request",
        429: "Too many requests",
        503: "Service not ready",
    }
    slug = titles.get(status, "error").lower().replace(" ", "-")
    return {
        "type": f"urn:loradock:problem:{slug}",
        "title": titles.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": "/x",
        **extra,
    }


def sse(events: list[tuple[str, dict]]) -> bytes:
    """Server-sent events; the name ":" sends a comment line (a keep-alive) instead."""
    return b"".join(
        (": keep-alive\n\n" if e == ":" else f"event: {e}\ndata: {json.dumps(d)}\n\n").encode()
        for e, d in events
    )


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or hang up are part of the tests


class FakeServer:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], deque[Reply]] = {}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._httpd = _Quiet(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def on(self, method: str, path: str, *replies: Reply) -> FakeServer:
        self.routes[(method, path)] = deque(replies)
        return self

    def hits(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, method: str, path: str) -> Reply:
        with self._lock:
            queue = self.routes.get((method, path))
            if not queue:
                return Reply(404, problem(404, f"no route {method} {path}"))
            return queue.popleft() if len(queue) > 1 else queue[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                recorded = Recorded(
                    self.command,
                    url.path,
                    url.query,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    time.monotonic(),
                )
                with server._lock:
                    server.requests.append(recorded)
                reply = server._next(self.command, url.path)
                if reply.compute is not None:
                    answer = reply.compute(recorded)
                    status, answer = answer if isinstance(answer, tuple) else (reply.status, answer)
                    reply = replace(reply, status=status, body=answer, compute=None)
                time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.events is not None:
                    self._stream(reply)
                    return
                if isinstance(reply.body, bytes):
                    payload, ctype = reply.body, "application/octet-stream"
                elif isinstance(reply.body, str):
                    payload, ctype = reply.body.encode(), "text/plain"
                elif reply.body is None:
                    payload, ctype = b"", "application/json"
                else:
                    payload = json.dumps(reply.body).encode()
                    ctype = (
                        "application/problem+json" if reply.status >= 400 else "application/json"
                    )
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type or ctype)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def _stream(self, reply: Reply) -> None:
                payload = sse(reply.events or [])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                promised = len(payload) + (1000 if reply.break_stream else 0)
                self.send_header("Content-Length", str(promised))
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()
                if reply.break_stream:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_POST = do_DELETE = do_PUT = _handle

        return Handler


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
