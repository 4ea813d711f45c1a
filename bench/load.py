"""Loopback load test of a real `loradock serve` (default model): many clients, many adapters.

1. Start a server, train --adapters small adapters (3 fortunes categories each, 1 epoch) and one
   adapter `swap` with two versions.
2. Offline baseline, in this process: the same base model and adapters in an Engine, batches of
   --batch mixed-adapter rows back to back -> rows/s (what the hardware can do without HTTP).
3. Load: --clients concurrent clients (asyncio + httpx, keep-alive), each sending one-text predict
   requests to random adapters for --seconds -> rows/s, p50/p99 latency, failures; meanwhile the
   `swap` adapter is promoted --promotions times, alternating versions, and a watcher checks that
   every request sent after a promotion's acknowledgement is answered by the promoted version.
4. The same load while a training job (510 texts, default hyperparameters) runs.

    .venv/bin/python bench/load.py [--adapters 100] [--clients 64] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fortunes import load_categories, make_split

from tests.integration.test_hot_swap import stale_answers
from tests.server import ServerProcess


def build_adapters(c: httpx.Client, n: int, cats: dict[str, list[str]]) -> list[str]:
    names = sorted(c for c in cats if len(cats[c]) >= 40)
    rng = random.Random(0)
    jobs = []
    for i in range(n):
        three = rng.sample(names, 3)
        rows = [{"text": t, "label": cat} for cat in three for t in rng.sample(cats[cat], 20)]
        body = {"name": f"a{i}", "training_data": rows, "hyperparameters": {"epochs": 1}}
        r = c.post("/v1/adapters", json=body)
        r.raise_for_status()
        jobs.append(r.json()["job"]["id"])
    wait_jobs(c, jobs)
    return [f"a{i}" for i in range(n)]


def wait_jobs(c: httpx.Client, jobs: list[str]) -> None:
    for job in jobs:
        while (status := c.get(f"/v1/jobs/{job}").json()["status"]) in ("queued", "running"):
            time.sleep(0.2)
        if status != "succeeded":
            raise SystemExit(f"job {job} {status}")


def offline_rows_per_second(
    data_dir: Path, adapters: list[str], batch: int, seconds: float
) -> float:
    """The same engine without HTTP: mixed batches back to back in this process."""
    from sqlalchemy import select

    from loradock.adapters.artifacts.store import LocalStore
    from loradock.adapters.core.base import BaseModel, default_base_model_path
    from loradock.adapters.serving.engine import Engine
    from loradock.adapters.serving.slots import AdapterRef, SlotPool
    from loradock.service.db.models import Adapter, Version
    from loradock.service.db.registry import Database

    base = BaseModel.load(default_base_model_path())
    base.warm_up()
    db = Database(f"sqlite:///{data_dir / 'loradock.db'}")
    with db.session() as s:
        rows = s.execute(
            select(Adapter.id, Version.version, Version.artifact_key)
            .join(Version, Version.adapter_id == Adapter.id)
            .where(Adapter.name.in_(adapters), Version.version == Adapter.live_version)
        ).all()
    pool = SlotPool(base, base.default_target_modules(), max_rank=8, capacity=len(rows) + 1)
    engine = Engine(base, pool, LocalStore(data_dir / "artifacts"))
    residents = [engine.acquire(AdapterRef(aid, v, key=key)) for aid, v, key in rows]
    texts = [t for ts in load_categories().values() for t in ts]
    rng = random.Random(1)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        rs = [rng.choice(residents) for _ in range(batch)]
        engine.run(rs, [rng.choice(texts) for _ in range(batch)])
        done += batch
    return done / (time.perf_counter() - start)


async def load(
    url: str, key: str, adapters: list[str], clients: int, seconds: float, texts: list[str],
    promotions: int = 0,
) -> dict:  # fmt: skip
    latencies: list[float] = []
    failures: list[str] = []
    swap_log: list[tuple[float, float, int]] = []  # (sent, received, version) for `swap`
    acks: list[tuple[float, float, int]] = []  # (started, acknowledged, version)
    stop = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as c:

        async def client(i: int) -> None:
            rng = random.Random(i)
            while time.perf_counter() < stop:
                name = "swap" if promotions and i % 8 == 0 else rng.choice(adapters)
                t0 = time.perf_counter()
                try:
                    r = await c.post(
                        f"/v1/adapters/{name}/predict", json={"inputs": [rng.choice(texts)]}
                    )
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                t1 = time.perf_counter()
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:100]}")
                    continue
                latencies.append(t1 - t0)
                if name == "swap":
                    swap_log.append((t0, t1, r.json()["version"]))

        async def promoter() -> None:
            gap = seconds / (promotions + 1)
            for k in range(promotions):
                await asyncio.sleep(gap)
                version = 2 if k % 2 == 0 else 1
                started = time.perf_counter()
                r = await c.post(f"/v1/adapters/swap/versions/{version}/promote")
                if r.status_code != 200:
                    failures.append(f"promote {r.status_code}")
                acks.append((started, time.perf_counter(), version))

        t_start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)), promoter())
        elapsed = time.perf_counter() - t_start
    stale = len(stale_answers(swap_log, acks))
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "rows_per_s": len(lat) / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
        "failures": failures,
        "swap_requests": len(swap_log),
        "stale_after_ack": stale,
        "promotions": len(acks),
    }


def report(label: str, r: dict, offline: float) -> None:
    print(
        f"{label}: {r['requests']} requests, {r['rows_per_s']:.1f} rows/s "
        f"({r['rows_per_s'] / offline:.2f}x offline engine), p50 {r['p50_ms']:.0f} ms, "
        f"p99 {r['p99_ms']:.0f} ms, failures {len(r['failures'])}"
        + (f" {r['failures'][:3]}" if r["failures"] else "")
    )
    if r["promotions"]:
        print(
            f"  hot-swap: {r['promotions']} promotions during the load, {r['swap_requests']} "
            f"requests to the swapped adapter, {r['stale_after_ack']} answered by the old version "
            "after the promotion was acknowledged"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--promotions", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    cats = load_categories()
    texts = [t for ts in cats.values() for t in ts]
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "data"
        server = ServerProcess(data, max_batch_rows=args.batch, max_wait_ms=5, max_queue_rows=4096)
        with server, server.client(timeout=120) as c:
            t0 = time.perf_counter()
            adapters = build_adapters(c, args.adapters, cats)
            swap_rows, _ = make_split(n_classes=3, train_per_class=20, val_per_class=0, seed=3)
            r = c.post("/v1/adapters", json={"name": "swap", "training_data": swap_rows,
                                              "hyperparameters": {"epochs": 1}})  # fmt: skip
            wait_jobs(c, [r.json()["job"]["id"]])
            r = c.post("/v1/adapters/swap/versions", json={
                "training_data": swap_rows, "hyperparameters": {"epochs": 1, "seed": 1},
                "promote": "never"})  # fmt: skip
            wait_jobs(c, [r.json()["job"]["id"]])
            print(f"trained {args.adapters + 1} adapters in {time.perf_counter() - t0:.0f}s")
            server_url, key = server.url, server.admin_key

            offline = offline_rows_per_second(data, adapters, args.batch, 10)
            print(f"offline engine: {offline:.1f} rows/s (batches of {args.batch} mixed adapters)")
            first = asyncio.run(load(server_url, key, adapters, args.clients, args.seconds, texts,
                                     promotions=args.promotions))  # fmt: skip
            report(f"{args.clients} clients over {args.adapters} adapters", first, offline)

            train_rows, val_rows = make_split(seed=0)
            big = {"name": "big", "training_data": train_rows, "validation_data": val_rows}
            job = c.post("/v1/adapters", json=big).json()["job"]["id"]
            time.sleep(3)
            during = asyncio.run(load(server_url, key, adapters, args.clients, args.seconds, texts))
            status = c.get(f"/v1/jobs/{job}").json()
            report("same load while a training job runs", during, offline)
            progress = status["progress"]
            print(
                f"  the training job meanwhile: {status['status']}, "
                f"step {progress.get('step')}/{progress.get('steps')}"
            )
            c.post(f"/v1/jobs/{job}/cancel")


if __name__ == "__main__":
    main()
