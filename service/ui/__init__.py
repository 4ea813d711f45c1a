"""The web console at /ui: one page and its scripts, served from this package (no CDN, no build
step), a pure client of the public API.

The page signs in with an API key kept in `sessionStorage` and sends it only as a Bearer header;
it sees exactly what that key may see. Every /ui response carries a strict Content-Security-Policy
(scripts and styles from this origin only, no inline script, no framing), and the API's answers
say `Cache-Control: no-store` (loradock.service.observability), so no tenant data is cached.

The scripts and styles hold no tenant data, so they are cached for good: they are served under
`/ui/static/<digest>/...`, where the digest covers every static file, with `immutable`; the page
itself (`/ui`) is revalidated on every load and names the current digest, so a new release is
picked up at once and a cold load asks for the page alone.
"""

from __future__ import annotations

import hashlib
import mimetypes
from functools import cache
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.responses import FileResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loradock.service.errors import NotFound

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
]
_NAMES = {name for name, _ in HEADERS}
PAGE_CACHE = "no-cache"  # the page: revalidated every time (it names the assets' digest)
ASSET_CACHE = "public, max-age=31536000, immutable"


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
                kept = [(k, v) for k, v in message.get("headers", []) if k not in _NAMES]
                if not any(k == b"cache-control" for k, _ in kept):
                    kept.append((b"cache-control", PAGE_CACHE.encode()))
                message = {**message, "headers": kept + HEADERS}
            await send(message)

        await self.app(scope, receive, with_headers)


@cache
def digest() -> str:
    """A digest of every static file (names and bytes): the assets' URL segment."""
    h = hashlib.sha256()
    for path in sorted(p for p in STATIC.rglob("*") if p.is_file()):
        h.update(path.relative_to(STATIC).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@cache
def page() -> bytes:
    """index.html with its asset URLs under the current digest."""
    text = (STATIC / "index.html").read_text()
    return text.replace("/ui/static/", f"/ui/static/{digest()}/").encode()


def install_ui(app: FastAPI) -> None:
    """/ui (the page; its views are #fragments) and /ui/static/<digest>/... (the assets)."""

    def console() -> Response:
        return Response(page(), media_type="text/html; charset=utf-8")

    app.add_api_route("/ui", console, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ui/", console, methods=["GET"], include_in_schema=False)

    @app.get("/ui/static/{version}/{path:path}", include_in_schema=False)
    def asset(version: str, path: str) -> FileResponse:
        file = (STATIC / path).resolve()
        if not file.is_relative_to(STATIC.resolve()) or not file.is_file() or path == "index.html":
            raise NotFound(f"no console file {path!r}")
        # Another digest (a page from before a release): still served, but not kept for good.
        cache_control = ASSET_CACHE if version == digest() else PAGE_CACHE
        media = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if file.suffix == ".js":
            media = "text/javascript"
        return FileResponse(file, media_type=media, headers={"Cache-Control": cache_control})

    app.add_middleware(ConsoleHeaders)
