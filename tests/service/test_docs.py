"""The API reference pages work without internet access: every script, style and icon they load
comes from the app itself."""

import re

import pytest


@pytest.mark.parametrize(("page", "script"), [("/docs", "swagger-ui-bundle.js"),
                                              ("/redoc", "redoc.standalone.js")])  # fmt: skip
def test_reference_pages_load_everything_from_the_app(app_client, page, script):
    html = app_client.get(page)
    assert html.status_code == 200
    assert html.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html.text)  # Swagger UI's spec URL
    assert urls, html.text
    assert not [u for u in urls if re.match(r"(https?:)?//", u)], urls  # no other origin
    assert "fonts.googleapis" not in html.text
    assert f"/docs-assets/{script}" in urls
    for url in urls:
        got = app_client.get(url)
        assert got.status_code == 200, url
    js = app_client.get(f"/docs-assets/{script}")
    assert "javascript" in js.headers["content-type"]
    assert len(js.content) > 500_000  # the real bundle, not a stub


def test_the_spec_the_pages_read_is_served_and_missing_assets_are_404(app_client):
    spec = app_client.get("/openapi.json").json()
    assert spec["info"]["title"] == "loradock"
    assert "/docs" not in spec["paths"]  # the pages are not part of the API
    assert app_client.get("/docs-assets/nope.js").status_code == 404
    assert app_client.get("/docs-assets/../app.py").status_code == 404
