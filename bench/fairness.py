"""Predict latency of one tenant while another sends one huge request (real server, real model).

The head-of-line case of issue 13: tenant "mallory" sends 256 texts of 10,000 characters (every
text truncated at max_seq_length tokens: 65,536 tokens); tenant "alice" sends one-text predicts
back to back meanwhile. Fair passes (round-robin across tenants, LORADOCK_MAX_BATCH_TOKENS per
pass) keep alice's latency near idle; before, alice waited for all of mallory's passes.

1. Start `loradock serve` (default model); each tenant trains a small adapter `reader`
   (fortunes, 3 categories x 20 quotes, 1 epoch).
2. Idle: alice's one-text predicts for --idle-seconds -> p50/p99.
3. Huge: mallory's request in flight, alice predicting -> alice's p50/p99 and worst, the ratio
   to idle, and how long the huge request took.
Repeated --runs times; medians printed. Extra settings: --set name=value (e.g. max_batch_tokens).
The numbers in bench/README.md use --set max_queue_wait_ms=0: the code before fair passes
refused the huge request with 429 whenever anything was queued (its wait limit counted the
request's own rows), so a before/after comparison needs the wait limit off on both sides.

    .venv/bin/python bench/fairness.py [--runs 3] [--set max_batch_tokens=2048]
"""

from __future__ import annotations

import argparse
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
from upload import percentile

from tests.server import ServerProcess


def predict_loop(c: httpx.Client, texts: list[str], stop: threading.Event) -> list[float]:
    seconds = []
    i = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        r = c.post("/v1/adapters/reader/predict", json={"inputs": [texts[i % len(texts)]]})
        r.raise_for_status()
        seconds.append(time.perf_counter() - t0)
        i += 1
    return seconds


def one_run(srv: ServerProcess, keys: dict[str, str], texts: list[str], huge: list[str],
            idle_seconds: float) -> tuple[float, float, float, float, float, float]:  # fmt: skip
    with srv.client(keys["alice"], timeout=120) as c:
        stop = threading.Event()
        timer = threading.Timer(idle_seconds, stop.set)
        timer.start()
        idle = predict_loop(c, texts, stop)
        took: dict[str, float] = {}

        def send_huge() -> None:
            try:
                with srv.client(keys["mallory"], timeout=900) as m:
                    t0 = time.perf_counter()
                    r = m.post("/v1/adapters/reader/predict", json={"inputs": huge})
                    took["seconds"] = time.perf_counter() - t0
                    took["status"] = r.status_code
            finally:
                stop.set()

        stop.clear()
        thread = threading.Thread(target=send_huge)
        thread.start()
        during = predict_loop(c, texts, stop)
        thread.join()
    if took.get("status") != 200:
        raise SystemExit(f"the huge request was answered {took.get('status')}: nothing measured")
    return (
        percentile(idle, 0.5), percentile(idle, 0.99), percentile(during, 0.5),
        percentile(during, 0.99), max(during), took["seconds"],
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--set", action="append", default=[], help="a server setting, name=value")
    args = ap.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    cats = load_categories()
    names = sorted(c for c in cats if len(cats[c]) >= 40)[:3]
    texts = [t for n in names for t in cats[n][20:60]]
    long_text = " ".join(t for n in names for t in cats[n])[:10_000]
    huge = [long_text] * 256
    with tempfile.TemporaryDirectory() as d, ServerProcess(Path(d) / "data", **settings) as srv:
        keys = {}
        with srv.client(timeout=120) as admin:
            for who in ("alice", "mallory"):
                tenant = admin.post("/v1/tenants", json={"name": who}).json()["id"]
                keys[who] = admin.post(f"/v1/tenants/{tenant}/keys",
                                       json={"scopes": ["train"]}).json()["key"]  # fmt: skip
        for key in keys.values():
            with srv.client(key, timeout=120) as c:
                train = [{"text": t, "label": n} for n in names for t in cats[n][:20]]
                r = c.post("/v1/adapters", json={"name": "reader", "training_data": train,
                                                 "hyperparameters": {"epochs": 1}})  # fmt: skip
                r.raise_for_status()
                wait_jobs(c, [r.json()["job"]["id"]])
        results = [one_run(srv, keys, texts, huge, args.idle_seconds) for _ in range(args.runs)]
    for i, (ip50, ip99, dp50, dp99, worst, took) in enumerate(results, start=1):
        print(
            f"run {i}: idle p50 {ip50 * 1000:.1f} ms p99 {ip99 * 1000:.1f} ms | beside the "
            f"huge request p50 {dp50 * 1000:.1f} ms p99 {dp99 * 1000:.1f} ms worst "
            f"{worst * 1000:.1f} ms ({dp99 / ip99:.2f}x idle p99) | huge request {took:.1f} s"
        )
    med = [statistics.median(r[k] for r in results) for k in range(6)]
    print(
        f"median of {args.runs}: idle p99 {med[1] * 1000:.1f} ms, beside the huge request p99 "
        f"{med[3] * 1000:.1f} ms = {med[3] / med[1]:.2f}x idle (worst {med[4] * 1000:.1f} ms); "
        f"p50 {med[0] * 1000:.1f} -> {med[2] * 1000:.1f} ms; huge request {med[5]:.1f} s"
    )


if __name__ == "__main__":
    main()
