"""The console's files as the app serves them: everything from this origin, no inline script,
the security headers on every /ui response, the vendored uPlot exactly as published."""

import hashlib
import re
from pathlib import Path

from loradock.service.ui import CSP, STATIC, digest

VENDOR = STATIC / "vendor" / "uplot"


def modules(text: str) -> list[str]:
    return re.findall(r"""^import .*? from ["'](\./[^"']+|\.\./[^"']+)["'];""", text, re.M)


def test_the_page_loads_only_files_of_this_origin_and_no_inline_script(app_client):
    page = app_client.get("/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert not [u for u in urls if re.match(r"(https?:)?//", u)], urls
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text)  # every script has a src
    assert not re.search(r"\son[a-z]+\s*=", page.text)  # no inline event handlers
    loaded = [u for u in urls if u.startswith("/ui/")]
    app_js = f"/ui/static/{digest()}/js/app.js"
    assert app_js in loaded
    # Follow every ES module import from app.js: all are served, as JavaScript.
    todo, seen = [app_js], set()
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        got = app_client.get(url)
        assert got.status_code == 200, url
        assert "javascript" in got.headers["content-type"], url
        base = url.rsplit("/", 1)[0]
        for rel in modules(got.text):
            parts = f"{base}/{rel}".split("/")
            out: list[str] = []
            for part in parts:
                if part == "..":
                    out.pop()
                elif part != ".":
                    out.append(part)
            todo.append("/".join(out))
    assert len(seen) >= 9  # app, api, dom, charts and the pages
    for url in loaded:
        assert app_client.get(url).status_code == 200, url


def test_every_ui_response_carries_the_security_headers(app_client):
    assets = f"/ui/static/{digest()}"
    for url in ("/ui", "/ui/", f"{assets}/js/app.js", f"{assets}/console.css", f"{assets}/nope.js"):
        got = app_client.get(url)
        assert got.headers["content-security-policy"] == CSP, url
        assert got.headers["x-frame-options"] == "DENY"
        assert got.headers["x-content-type-options"] == "nosniff"
        assert got.headers["referrer-policy"] == "no-referrer"
    assert "'unsafe-inline'" not in CSP
    assert "'unsafe-eval'" not in CSP
    assert "frame-ancestors 'none'" in CSP
    assert app_client.get(f"{assets}/nope.js").status_code == 404
    assert app_client.get(f"{assets}/../__init__.py").status_code == 404
    assert app_client.get(f"{assets}/%2e%2e/__init__.py").status_code == 404
    assert app_client.get(f"{assets}/index.html").status_code == 404  # the page is /ui
    # Assets are kept for good under their digest; the page, which names it, never is.
    assert app_client.get(f"{assets}/js/app.js").headers["cache-control"].endswith("immutable")
    assert app_client.get("/ui").headers["cache-control"] == "no-cache"
    old = app_client.get("/ui/static/0000000000000000/js/app.js")  # a page from before
    assert old.status_code == 200
    assert old.headers["cache-control"] == "no-cache"
    # Not on the API: its answers are JSON, never stored by a browser or a proxy.
    api = app_client.get("/v1/adapters")
    assert "content-security-policy" not in api.headers
    assert api.headers["cache-control"] == "no-store"


def test_uplot_is_vendored_as_published_with_its_licence():
    listed = dict(
        reversed(line.split()) for line in (VENDOR / "VERSION").read_text().splitlines()
        if re.fullmatch(r"[0-9a-f]{64}  \S+", line)
    )  # fmt: skip
    assert set(listed) == {"uPlot.iife.min.js", "uPlot.min.css"}
    for name, sha256 in listed.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == sha256, name
    assert "MIT License" in (VENDOR / "LICENSE").read_text()
    assert "uPlot 1.6.32" in (VENDOR / "VERSION").read_text()


def test_scripts_never_build_html_from_strings():
    """Data from the API is put into the page with textContent only (dom.js's `h`)."""
    for path in Path(STATIC / "js").rglob("*.js"):
        text = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{path.name} uses {sink}"
        assert "localStorage" not in text, f"{path.name}: the key belongs in sessionStorage"


def test_every_module_is_preloaded_so_the_page_loads_them_at_once(app_client):
    page = app_client.get("/ui").text
    pattern = rf'<link rel="modulepreload" href="/ui/static/{digest()}/js/([^"]+)">'
    preloaded = set(re.findall(pattern, page))
    files = {p.relative_to(STATIC / "js").as_posix() for p in (STATIC / "js").rglob("*.js")}
    assert preloaded == files - {"app.js"}
