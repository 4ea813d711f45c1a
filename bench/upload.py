"""Predict latency of one tenant while another uploads a 50,000-row dataset (real server).

Dataset parsing, validation (up to max_dataset_rows rows), the store write and the registry rows
all run in the thread pool, never on the event loop that batches predictions; this measures it.

1. Start `loradock serve` (default model) and train a small adapter `reader` (fortunes, 3
   categories x 20 quotes, 1 epoch).
2. Idle: one client sends one-text predicts to `reader` back to back for --idle-seconds -> p50/p99.
3. Upload: another tenant POSTs a --rows row dataset (JSON body, fortunes quotes made unique) to
   /v1/adapters while the same client keeps predicting; latency of the predicts sent while the
   upload request was in flight -> p50/p99, and the ratio to idle. Steps 2-3 run on a restart of
   the same server with job_workers=0, so the upload's job waits instead of training (this
   measures the upload, not training).
Repeated --runs times; medians printed.

    .venv/bin/python bench/upload.py [--rows 50000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fortunes import load_categories
from load import wait_jobs

from tests.server import ServerProcess

JSON = {"Content-Type": "application/json"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def predict_loop(c: httpx.Client, texts: list[str], stop: threading.Event) -> list[float]:
    rng = random.Random(1)
    seconds = []
    while not stop.is_set():
        t0 = time.perf_counter()
        r = c.post("/v1/adapters/reader/predict", json={"inputs": [rng.choice(texts)]})
        r.raise_for_status()
        seconds.append(time.perf_counter() - t0)
    return seconds


def big_dataset(cats: dict[str, list[str]], rows: int) -> list[dict]:
    names = sorted(cats, key=lambda c: -len(cats[c]))[:10]
    out = []
    for i in range(rows):
        cat = names[i % len(names)]
        quotes = cats[cat]
        out.append({"text": f"{quotes[(i // len(names)) % len(quotes)]} (#{i})", "label": cat})
    return out


def one_run(srv: ServerProcess, admin: httpx.Client, texts: list[str], rows: list[dict],
            idle_seconds: float, run: int) -> tuple[float, float, float, float, float]:  # fmt: skip
    with srv.client(timeout=60) as c:
        stop = threading.Event()
        timer = threading.Timer(idle_seconds, stop.set)
        timer.start()
        idle = predict_loop(c, texts, stop)

        tenant = admin.post("/v1/tenants", json={"name": f"uploader{run}"}).json()
        key = admin.post(f"/v1/tenants/{tenant['id']}/keys", json={"scopes": ["train"]}).json()
        uploaded: dict[str, float] = {}
        # Encoded before the clock starts: this process's own JSON encoding would hold its GIL
        # and delay its predict loop, which is not what is measured.
        body = json.dumps(
            {"name": "big", "training_data": rows, "hyperparameters": {"epochs": 1}}
        ).encode()

        def upload() -> None:
            with srv.client(key["key"], timeout=600) as u:
                t0 = time.perf_counter()
                r = u.post("/v1/adapters", content=body, headers=JSON)
                uploaded["seconds"] = time.perf_counter() - t0
                r.raise_for_status()
                stop.set()

        stop.clear()
        thread = threading.Thread(target=upload)
        thread.start()
        during = predict_loop(c, texts, stop)
        thread.join()
    return (
        percentile(idle, 0.5), percentile(idle, 0.99),
        percentile(during, 0.5), percentile(during, 0.99), uploaded["seconds"],
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    args = ap.parse_args()
    cats = load_categories()
    rows = big_dataset(cats, args.rows)
    size = len(httpx.Request("POST", "http://x", json=rows).content)
    print(f"upload: {len(rows)} rows, {size / 2**20:.1f} MiB of JSON")
    names = sorted(c for c in cats if len(cats[c]) >= 40)[:3]
    texts = [t for n in names for t in cats[n][20:60]]
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "data"
        with ServerProcess(data) as srv, srv.client(timeout=120) as admin:
            train = [{"text": t, "label": n} for n in names for t in cats[n][:20]]
            r = admin.post("/v1/adapters", json={"name": "reader", "training_data": train,
                                                 "hyperparameters": {"epochs": 1}})  # fmt: skip
            r.raise_for_status()
            wait_jobs(admin, [r.json()["job"]["id"]])
        # The same data, served by a process that trains nothing: the uploads' jobs stay queued,
        # so what is measured is the upload itself, not training.
        with ServerProcess(data, job_workers=0) as srv, srv.client(timeout=120) as admin:
            results = [
                one_run(srv, admin, texts, rows, args.idle_seconds, i) for i in range(args.runs)
            ]
    for i, (ip50, ip99, dp50, dp99, up) in enumerate(results, start=1):
        print(f"run {i}: idle p50 {ip50 * 1000:.1f} ms p99 {ip99 * 1000:.1f} ms | during upload "
              f"p50 {dp50 * 1000:.1f} ms p99 {dp99 * 1000:.1f} ms ({dp99 / ip99:.2f}x idle p99)"
              f" | upload took {up:.1f} s")  # fmt: skip
    med = [statistics.median(r[k] for r in results) for k in range(5)]
    print(f"median of {args.runs}: idle p99 {med[1] * 1000:.1f} ms, during upload p99 "
          f"{med[3] * 1000:.1f} ms = {med[3] / med[1]:.2f}x idle; p50 {med[0] * 1000:.1f} -> "
          f"{med[2] * 1000:.1f} ms; upload {med[4]:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
