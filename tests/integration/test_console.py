"""The web console (/ui) in a real headless browser: Debian's chromium driven by Playwright for
Python, against a real server on a loopback port.

One story, as a person would go through it: sign in with a key, create an adapter from a small
file, watch its curve grow while it trains, see the finished curves with the restored epoch,
predict, retrain, roll back and promote, and a key of another tenant that sees none of it; with
the page's security (CSP, no framing, the key never in a URL, nothing cached) checked on the way.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.datasets import keyword_rows
from tests.server import ServerProcess

pytestmark = pytest.mark.integration
WRONG_KEY = "ldk_not-a-key-0000000000000000"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What the machine's closed network needs (no background connections), and root in CI.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip

if CHROMIUM is None:  # pragma: no cover - .ci/run installs it
    pytest.skip(
        "chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api")


def training_file(path: Path, rows: int, seed: int = 0) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        for row in keyword_rows(rows, seed=seed):
            writer.writerow({"text": row["text"], "label": row["label"]})
    return path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("console") / "data"
    with ServerProcess(data, base_model=tiny_bert_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Watched:
    """A page with its console errors, failed requests and every request URL recorded."""

    def __init__(self, browser: Any, server: ServerProcess, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.requests: list[Any] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r))
        self.url = server.url

    def sign_in(self, key: str) -> None:
        self.page.goto(f"{self.url}/ui")
        self.page.fill("#signin input[name=key]", key)
        self.page.click("#signin button[type=submit]")
        self.page.wait_for_selector("#nav a[href='#/adapters']")


def test_console_story(server: ServerProcess, browser: Any, tmp_path: Path):
    admin = server.admin_key
    w = Watched(browser, server, viewport={"width": 1280, "height": 800})
    page = w.page

    # --- the page itself: served by the app, strict headers ---------------------------------
    response = page.goto(f"{server.url}/ui")
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    page.wait_for_selector("#signin")
    assert page.evaluate("sessionStorage.length") == 0

    # A wrong key is refused and not kept.
    page.fill("#signin input[name=key]", WRONG_KEY)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#signin .error:has-text('not valid')")
    assert page.evaluate("sessionStorage.length") == 0

    w.sign_in(admin)
    page.wait_for_selector("#no-adapters")
    assert page.evaluate("Object.values(sessionStorage)") == [admin]

    # --- create an adapter from a file and watch it train -----------------------------------
    page.fill("form[data-form=create] input[name=name]", "tickets")
    page.set_input_files("form[data-form=create] input[name=training_file]",
                         str(training_file(tmp_path / "train.csv", 600)))  # fmt: skip
    page.fill("form[data-form=create] input[name=epochs]", "12")
    page.evaluate("""() => {  // every epoch count the job page shows, as it shows it
        window.__counts = [];
        new MutationObserver(() => {
            const el = document.getElementById("job-epochs");
            if (el && !document.getElementById("job-final")) window.__counts.push(el.dataset.count);
        }).observe(document.body, {subtree: true, childList: true, attributes: true});
    }""")
    page.click("form[data-form=create] button[type=submit]")
    page.wait_for_url("**/ui#/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#job-final", timeout=180_000)
    seen = sorted({int(c) for c in page.evaluate("window.__counts")})
    assert len([c for c in seen if c > 0]) >= 2, f"the curve did not grow live: {seen}"
    final = page.text_content("#job-final")
    assert "succeeded" in final
    assert "restored epoch" in final
    restored = int(final.split("restored epoch ")[1].split(",")[0].split()[0])
    marker = page.get_attribute("#live-curves .chart[data-marker]", "data-marker")
    assert int(marker) == restored
    with server.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded"
        adapter_id = job["adapter_id"]

    # --- the adapter: versions, curves with the restored epoch, baseline, per-class, predict ---
    page.click("#job-result a")
    page.wait_for_selector("#versions tr[data-version='1']")
    assert page.get_attribute("#curves .chart[data-marker]", "data-marker") == str(restored)
    assert page.locator("#curves canvas").count() >= 2  # loss and macro-F1
    assert "probe" in page.text_content("#baseline")
    assert page.locator("#per-class tbody tr").count() == 3
    page.fill("#try-it textarea", "refund my card charge")
    page.click("#try-it button")
    page.wait_for_selector("#try-output .answer")
    assert page.text_content("#try-output .answer").startswith("v1: ")

    # --- retrain from a file, then roll back and promote ----------------------------------------
    page.set_input_files("form[data-form=retrain] input[name=training_file]",
                         str(training_file(tmp_path / "again.csv", 60, seed=5)))  # fmt: skip
    page.select_option("form[data-form=retrain] select[name=promote]", "always")
    page.click("form[data-form=retrain] button[type=submit]")
    page.wait_for_url("**/ui#/jobs/*")
    page.wait_for_selector("#job-final", timeout=180_000)
    page.goto(f"{server.url}/ui#/adapters/{adapter_id}")
    page.wait_for_selector("#versions tr[data-version='2']")
    assert "live" in page.text_content("#versions tr[data-version='2']")
    page.click("button[data-promote='1']")  # "Roll back to v1"
    page.wait_for_selector("#versions tr[data-version='1'] .badge.ok:has-text('live')")
    with server.client() as c:
        assert c.get(f"/v1/adapters/{adapter_id}").json()["live_version"] == 1
    assert page.text_content("button[data-promote='2']") == "Promote v2"
    page.click("button[data-promote='2']")
    page.wait_for_selector("#versions tr[data-version='2'] .badge.ok:has-text('live')")
    with server.client() as c:
        assert c.get(f"/v1/adapters/{adapter_id}").json()["live_version"] == 2

    # --- monitoring and admin pages render ----------------------------------------------------
    page.goto(f"{server.url}/ui#/adapters/{adapter_id}/monitoring")
    page.wait_for_selector("#flags")
    page.wait_for_selector("#drift")
    page.goto(f"{server.url}/ui#/admin")
    page.wait_for_selector("#tenants")
    page.fill("#new-tenant input[name=tenant]", "other-co")
    page.click("#new-tenant button")
    page.wait_for_selector("#tenants tr:has-text('other-co')")
    page.select_option("form[data-tenant='other-co'] select", "train")
    page.click("form[data-tenant='other-co'] button")
    other_key = page.text_content("#new-key .secret").strip()
    assert other_key.startswith("ldk_")

    # --- security along the way: the key only ever in an Authorization header ---------------
    api_requests = [r for r in w.requests if "/v1/" in r.url]
    assert api_requests
    assert all(admin not in r.url and other_key not in r.url for r in w.requests)
    sent = {r.headers.get("authorization") for r in api_requests}
    assert sent == {f"Bearer {admin}", f"Bearer {WRONG_KEY}"}  # the refused sign-in, then ours
    assert admin not in page.url
    cached = httpx.get(f"{server.url}/v1/adapters", headers={"Authorization": f"Bearer {admin}"})
    assert cached.headers["cache-control"] == "no-store"
    # The one failed load is the refused sign-in's 401; no script error, no CSP violation.
    assert [e for e in w.errors if "401" not in e] == []
    assert len(w.errors) == 1

    # --- another tenant's key sees none of it ---------------------------------------------------
    other = Watched(browser, server, viewport={"width": 390, "height": 844})
    other.sign_in(other_key)
    other.page.wait_for_selector("#no-adapters")
    assert "Tenants and keys" not in other.page.text_content("#nav")
    other.page.goto(f"{server.url}/ui#/adapters/{adapter_id}")
    other.page.wait_for_selector("main .error")
    assert "not found" in other.page.text_content("main .error")
    other.page.goto(f"{server.url}/ui#/jobs/{job_id}")
    other.page.wait_for_selector("main .error")
    other.page.goto(f"{server.url}/ui#/admin")
    other.page.wait_for_selector("main .error:has-text('admin scope')")
    # Signing out forgets the key.
    other.page.click("#signout")
    other.page.wait_for_selector("#signin")
    assert other.page.evaluate("sessionStorage.length") == 0
    assert [e for e in other.errors if "404" not in e] == []

    w.context.close()
    other.context.close()


def test_the_console_cannot_be_framed_or_inject_script(server: ServerProcess, browser: Any):
    """A hostile adapter name is shown as text; the page refuses to run in a frame."""
    with server.client() as c:
        rows = keyword_rows(20)
        name = "x<img src=x onerror=alert(1)>"
        r = c.post("/v1/adapters", json={"name": name, "training_data": rows})
    assert r.status_code == 422  # names are restricted anyway; the page never parses HTML
    w = Watched(browser, server)
    w.sign_in(server.admin_key)
    dialogs: list[str] = []
    w.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    w.page.set_content(f'<iframe src="{server.url}/ui"></iframe>')
    w.page.wait_for_timeout(500)
    frame = w.page.frames[-1]
    assert frame.url in ("about:blank", "chrome-error://chromewebdata/", "") or \
        frame.locator("#top").count() == 0  # fmt: skip
    assert dialogs == []
    w.context.close()


def test_generation_adapter_page_shows_the_base_forgetting_and_chats(
    tmp_path: Path, tiny_llama_dir: Path, browser: Any
):
    from tests.adapters.test_generation import sft_rows

    fast = {"learning_rate": 0.05, "epochs": 4, "batch_size": 8}
    server = ServerProcess(tmp_path / "d", base_model=tiny_llama_dir, max_seq_length=48)
    with server, server.client() as c:
        r = c.post("/v1/adapters", json={"name": "helpdesk", "training_data": sft_rows(),
                                         "hyperparameters": fast})  # fmt: skip
        assert r.status_code == 202, r.text
        job_id, adapter_id = r.json()["job"]["id"], r.json()["adapter"]["id"]
        w = Watched(browser, server)
        w.sign_in(server.admin_key)
        # The create form offers what this base can train: generation only.
        w.page.wait_for_selector("form[data-form=create] select[name=task]")
        options = w.page.locator(
            "form[data-form=create] select[name=task] option"
        ).all_inner_texts()
        assert options == ["generation"]
        w.page.goto(f"{server.url}/ui#/jobs/{job_id}")
        w.page.wait_for_selector("#job-final", timeout=180_000)
        assert "succeeded" in w.page.text_content("#job-final")
        w.page.goto(f"{server.url}/ui#/adapters/{adapter_id}")
        w.page.wait_for_selector("#baseline")
        assert "Adapter against the base model" in w.page.text_content("#baseline")
        assert "val_token_accuracy" in w.page.text_content("#baseline")
        forgetting = w.page.text_content("#forgetting")
        assert "Perplexity of the reference text: base" in forgetting
        w.page.fill("#try-it textarea", "hello")
        w.page.click("#try-it button")
        w.page.wait_for_selector("#try-output .answer, #try-output .error")
        assert w.page.locator("#try-output .error").count() == 0
        assert w.errors == []
        w.context.close()
