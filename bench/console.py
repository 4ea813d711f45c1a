"""The web console (/ui): page load times with 1000 adapters, and screenshots of every page.

    python bench/console.py [--out bench/console] [--adapters 1000] [--runs 7]

A real server on a loopback port with the default encoder (all-MiniLM-L6-v2). One real adapter
is trained through the API on three Debian `fortunes` categories, gets live traffic from a
fourth category (so its drift signals move) and labelled feedback (live accuracy); then 1000
more adapters with two versions each are written to the registry (display only: no artifacts),
so the list has 1001 adapters to page through. Chromium (Debian's, driven by Playwright) then:

- loads each page cold (`page.goto`, a full page load: HTML, scripts, the API calls) and warm
  (a `#/...` change inside the loaded console) `--runs` times, timing until the page's content
  is on screen; the median and the slowest are printed against the 300 ms goal;
- takes a full-page PNG of each page at 1280x800 (desktop) and 390x844 (phone) into `--out`.

Needs: chromium (apt-get install chromium), fortunes (apt-get install fortunes), playwright.
Run alone: it trains a model on the machine's cores.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from fortunes import load_categories  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from loradock.service.db.models import Adapter, Job, Version, new_id, utcnow  # noqa: E402
from loradock.service.db.registry import Database  # noqa: E402
from tests.server import ServerProcess  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip
VIEWPORTS = {"desktop": (1280, 800), "phone": (390, 844)}
TRAIN = ("computers", "food", "sports")  # three fortunes categories
SHIFTED = "politics"  # live traffic from elsewhere: the drift signals move


def wait_job(client, job_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(job)
        time.sleep(1)


def fill_registry(url: str, tenant_id: str, n: int, template: dict) -> None:
    """`n` display-only adapters (two ready versions each, the second live, a finished job)."""
    db = Database(url)
    rng = random.Random(0)
    start = utcnow()
    try:
        with db.session() as s:
            for i in range(n):
                at = start + timedelta(milliseconds=i)
                a = Adapter(id=new_id("ad"), tenant_id=tenant_id, name=f"customer-{i:04d}",
                            task="classification", labels=list(template["labels"]),
                            live_version=2, status="ready", created_at=at)  # fmt: skip
                s.add(a)
                s.flush()
                for v in (1, 2):
                    metrics = {**template["metrics"],
                               "val_macro_f1": round(rng.uniform(0.5, 0.95), 4)}  # fmt: skip
                    s.add(Version(adapter_id=a.id, version=v, status="ready", created_at=at,
                                  metrics=metrics, history=template["history"],
                                  baseline=template["baseline"], report=template["report"],
                                  hyperparameters=template["hyperparameters"]))  # fmt: skip
                s.add(Job(id=new_id("job"), tenant_id=tenant_id, adapter_id=a.id, version=2,
                          status="succeeded", history=template["history"],
                          created_at=at))  # fmt: skip
    finally:
        db.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "console")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    quotes = load_categories(max_chars=300)
    rng = random.Random(0)
    rows = [{"text": q, "label": c} for c in TRAIN for q in rng.sample(quotes[c], 60)]
    data = Path(tempfile.mkdtemp(prefix="loradock-console-")) / "data"
    with ServerProcess(data, threads=2) as server, server.client(timeout=120) as c:
        made = c.post("/v1/adapters", json={"name": "fortunes-topics", "training_data": rows,
                                             "hyperparameters": {"epochs": 8}}).json()  # fmt: skip
        adapter_id, job_id = made["adapter"]["id"], made["job"]["id"]
        job = wait_job(c, job_id)
        print(f"trained {adapter_id}: {job['status']} ({job['stop_reason']})", flush=True)
        # Live traffic: first like the training data, then from another category.
        for chunk in range(8):
            category = TRAIN[chunk % 3] if chunk < 4 else SHIFTED
            texts = rng.sample(quotes[category], 40)
            c.post(f"/v1/adapters/{adapter_id}/predict", json={"inputs": texts})
        for _ in range(6):  # feedback in runs, so live accuracy has a history
            items = [{"text": q, "label": c_} for c_ in TRAIN for q in rng.sample(quotes[c_], 5)]
            c.post(f"/v1/adapters/{adapter_id}/feedback", json={"items": items})
            time.sleep(0.2)
        c.post("/v1/tenants", json={"name": "acme"})
        tenant_id = c.get("/v1/whoami").json()["tenant_id"]
        full = c.get(f"/v1/adapters/{adapter_id}").json()
        live = full["versions"][0]
        template = {k: live[k] for k in ("metrics", "history", "baseline", "report",
                                         "hyperparameters")}  # fmt: skip
        template["labels"] = full["labels"]
        fill_registry(f"sqlite:///{data / 'loradock.db'}", tenant_id, args.adapters, template)
        total = len(c.get("/v1/adapters", params={"limit": 1000, "view": "summary"}).json()
                    ["adapters"])  # fmt: skip
        print(f"adapters in the list's first 1000: {total}", flush=True)

        pages = {  # route, what is on screen once the page has loaded
            "adapters": ("#/adapters", "#adapters tbody tr"),
            "adapters-search": ("#/adapters?q=customer-09", "#adapters tbody tr"),
            "adapter": (f"#/adapters/{adapter_id}", "#curves .chart canvas"),
            "job": (f"#/jobs/{job_id}", "#job-final"),
            "monitoring": (f"#/adapters/{adapter_id}/monitoring", "#live-accuracy"),
            "admin": ("#/admin", "#keys tbody tr"),
        }
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            timings: dict[str, dict[str, list[float]]] = {}
            # The floor: a bare loopback page (the /healthz JSON) loaded the same way.
            context = browser.new_context()
            page = context.new_page()
            bare = []
            for _ in range(args.runs):
                page.goto("about:blank")
                t0 = time.perf_counter()
                page.goto(f"{server.url}/healthz")
                page.wait_for_selector("body")
                bare.append(time.perf_counter() - t0)
            timings["(bare /healthz)"] = {"cold": bare, "warm": [0.0]}
            context.close()
            for label, (width, height) in VIEWPORTS.items():
                context = browser.new_context(viewport={"width": width, "height": height},
                                              device_scale_factor=1)  # fmt: skip
                page = context.new_page()
                page.goto(f"{server.url}/ui")
                page.wait_for_selector("#signin")
                page.screenshot(path=str(args.out / f"signin-{label}.png"), full_page=True)
                page.fill("#signin input[name=key]", server.admin_key)
                page.click("#signin button[type=submit]")
                page.wait_for_selector("#adapters")
                for name, (route, ready) in pages.items():
                    page.goto(f"{server.url}/ui{route}")
                    page.wait_for_selector(ready, timeout=60_000)
                    page.wait_for_timeout(300)  # charts finish drawing
                    page.screenshot(path=str(args.out / f"{name}-{label}.png"), full_page=True)
                    if label != "desktop":
                        continue
                    cold, warm = [], []
                    for _ in range(args.runs):
                        page.goto("about:blank")
                        t0 = time.perf_counter()
                        page.goto(f"{server.url}/ui{route}")
                        page.wait_for_selector(ready, timeout=60_000)
                        cold.append(time.perf_counter() - t0)
                        page.evaluate("location.hash = '#/signin-away'")
                        page.wait_for_selector("main :text('No such page')")
                        t0 = time.perf_counter()
                        page.evaluate(f"location.hash = {route!r}")
                        page.wait_for_selector(ready, timeout=60_000)
                        warm.append(time.perf_counter() - t0)
                    timings[name] = {"cold": cold, "warm": warm}
                context.close()
            browser.close()

    print(f"\npage load with {args.adapters + 1} adapters, median of {args.runs} (slowest), "
          "until the page's content is on screen; goal < 300 ms")  # fmt: skip
    print(f"{'page':16} {'cold load':>18} {'in the console':>18}")
    for name, t in timings.items():
        cell = {k: f"{1000 * statistics.median(v):6.0f} ms ({1000 * max(v):4.0f})"
                for k, v in t.items()}  # fmt: skip
        print(f"{name:16} {cell['cold']:>18} {cell['warm']:>18}")
    print(f"\nscreenshots in {args.out}")


if __name__ == "__main__":
    main()
