"""The web console at /ui: one page and its scripts, served from this package (no CDN, no build
step), a pure client of the public API.

The page signs in with an API key kept in `sessionStorage` and sends it only as a Bearer header;
it sees exactly what that key may see. Every /ui response carries a strict Content-Security-Policy
(scripts and styles from this origin only, no inline script, no framing), and the API's answers
say `Cache-Control: no-store` (loradock.service.observability), so no tenant data is cached.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    # Revalidated on every load (ETag), so a new release is picked up at once.
    (b"cache-control", b"no-cache"),
]


class ConsoleHeaders:
    """The security headers on every response under /ui."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not (path == "/ui" or path.startswith("/ui/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k not in names]
                message = {**message, "headers": kept + HEADERS}
            await send(message)

        await self.app(scope, receive, with_headers)


def install_ui(app: FastAPI) -> None:
    """/ui (the page; its views are #fragments) and /ui/static (scripts, styles, uPlot)."""
    index = STATIC / "index.html"

    @app.get("/ui", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(index, media_type="text/html")

    @app.get("/ui/", include_in_schema=False)
    def console_slash() -> FileResponse:
        return FileResponse(index, media_type="text/html")

    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    app.add_middleware(ConsoleHeaders)
