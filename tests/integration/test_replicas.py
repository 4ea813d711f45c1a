"""Two real server processes sharing one PostgreSQL registry and one artifact store directory.

What a second replica must get right: it starts beside the first without a second bootstrap,
serves what the first trained, sees the first's promotions and deletes within
`live_poll_seconds`, and, once both train, no job runs twice.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from loradock.service.db.models import ApiKey, Job, Tenant
from loradock.service.db.registry import Database
from tests.datasets import keyword_rows
from tests.pg import create_database
from tests.server import ServerProcess

pytestmark = pytest.mark.integration

POLL = 1.0  # LORADOCK_LIVE_POLL_SECONDS of both replicas
SLACK = 1.0  # one poll round trip plus scheduling on a busy 2-core machine
FAST = {"learning_rate": 0.05, "init_head_l2": 0.001, "batch_size": 8, "epochs": 2}
TEXTS = ["refund my invoice", "password login error", "package tracking late", "hello there"]


def wait_job(c: httpx.Client, job_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    return job


def start_together(*servers: ServerProcess) -> None:
    errors: list[BaseException] = []

    def start(server: ServerProcess) -> None:
        try:
            server.start()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors


def resident(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(r'^loradock_adapters_resident\{tier="device"\} (\S+)$', text, re.M)
    assert match is not None, text[:2000]
    return float(match.group(1))


def until(predicate, timeout: float, interval: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    """Poll `predicate` until it holds; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(interval)
    return time.monotonic() - started


def test_two_replicas_share_registry_and_store(tmp_path, tiny_bert_dir, postgres_url):
    url = create_database(postgres_url)
    shared = {
        "base_model": tiny_bert_dir,
        "database_url": url,
        "store_url": (tmp_path / "shared-store").as_uri(),  # one filesystem, as a shared volume
        "live_poll_seconds": POLL,
    }
    one_thread = {"OMP_NUM_THREADS": "1"}  # two trainers on a small CI box: no oversubscription
    a = ServerProcess(tmp_path / "a", env=one_thread, job_workers=1, **shared)
    b = ServerProcess(tmp_path / "b", env=one_thread, job_workers=0, **shared)
    registry = Database(url)
    try:
        start_together(a, b)

        # --- one bootstrap: one tenant, one admin key, one key file (in the bootstrapper's dir)
        key_files = [s.data_dir / "bootstrap-key" for s in (a, b)]
        had_key = [p.exists() for p in key_files]
        assert sum(had_key) == 1
        key = next(p for p in key_files if p.exists()).read_text().strip()
        assert sum("bootstrap: created" in s.log_path.read_text() for s in (a, b)) == 1
        with registry.session() as s:
            assert [t.name for t in s.scalars(select(Tenant))] == ["default"]
            assert len(s.scalars(select(ApiKey)).all()) == 1
        ca, cb = a.client(key), b.client(key)

        # --- trained through A, served by B: same version, same predictions
        r = ca.post(
            "/v1/adapters",
            json={"name": "routing", "training_data": keyword_rows(20), "hyperparameters": FAST},
        )
        assert r.status_code == 202, r.text
        wait_job(cb, r.json()["job"]["id"])  # B reads the job A runs
        pa = ca.post("/v1/adapters/routing/predict", json={"inputs": TEXTS}).json()
        pb = cb.post("/v1/adapters/routing/predict", json={"inputs": TEXTS}).json()
        assert pa["version"] == pb["version"] == 1
        for x, y in zip(pa["predictions"], pb["predictions"], strict=True):
            assert x["label"] == y["label"]
            assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)

        # --- a promote on A is seen by B within live_poll_seconds
        body = {"training_data": keyword_rows(20, seed=3), "hyperparameters": FAST,
                "promote": "never"}  # fmt: skip
        wait_job(ca, ca.post("/v1/adapters/routing/versions", json=body).json()["job"]["id"])
        assert (
            cb.post("/v1/adapters/routing/predict", json={"inputs": TEXTS}).json()["version"] == 1
        )
        assert ca.post("/v1/adapters/routing/versions/2/promote").status_code == 200

        def b_serves_v2() -> bool:
            r = cb.post("/v1/adapters/routing/predict", json={"inputs": TEXTS})
            assert r.status_code == 200, r.text
            return bool(r.json()["version"] == 2)

        seen = until(b_serves_v2, timeout=10)
        print(f"\npromote on A seen by B after {seen:.2f} s (bound {POLL} s)")
        assert seen <= POLL + SLACK
        for _ in range(5):  # and stays on it
            assert b_serves_v2()

        # --- a delete on A: B answers 404 within the bound, never serves it again, frees it
        assert resident(b) >= 1
        assert ca.delete("/v1/adapters/routing").status_code == 204

        def b_says_404() -> bool:
            r = cb.post("/v1/adapters/routing/predict", json={"inputs": TEXTS})
            assert r.status_code in (200, 404), r.text
            return r.status_code == 404

        gone = until(b_says_404, timeout=10)
        print(f"delete on A seen by B after {gone:.2f} s (bound {POLL} s)")
        assert gone <= POLL + SLACK
        for _ in range(3):
            assert b_says_404()
            pinned = cb.post("/v1/adapters/routing/predict", json={"inputs": TEXTS, "version": 2})
            assert pinned.status_code == 404
        assert resident(b) == 0  # B's slots no longer hold the deleted adapter

        # --- both replicas train. B restarts with a worker while A runs a (slow) job: B's
        # start-up recovery must leave a live replica's job alone (it is not a crashed one).
        other = ca.post("/v1/tenants", json={"name": "other"}).json()
        other_key = ca.post(f"/v1/tenants/{other['id']}/keys", json={"scopes": ["train"]}).json()
        slow = {**FAST, "epochs": 1000, "early_stopping": False}
        r = ca.post(
            "/v1/adapters",
            json={"name": "slow", "training_data": keyword_rows(20), "hyperparameters": slow},
        )
        slow_id = r.json()["job"]["id"]
        until(lambda: ca.get(f"/v1/jobs/{slow_id}").json()["status"] == "running", 30)
        b.stop()
        cb.close()
        b = ServerProcess(tmp_path / "b", env=one_thread, job_workers=1, **shared).start()
        cb = b.client(key)
        job = cb.get(f"/v1/jobs/{slow_id}").json()
        assert (job["status"], job["attempts"]) == ("running", 1)
        assert [p.exists() for p in key_files] == had_key
        with registry.session() as s:
            assert len(s.scalars(select(ApiKey)).all()) == 2  # no second bootstrap
        assert cb.post(f"/v1/jobs/{slow_id}/cancel").status_code == 202  # B cancels A's job
        until(lambda: ca.get(f"/v1/jobs/{slow_id}").json()["status"] == "cancelled", 30)

        clients = {"a": ca, "b": cb, "a2": a.client(other_key["key"]),
                   "b2": b.client(other_key["key"])}  # fmt: skip
        queued: dict[str, httpx.Client] = {}
        for via, c in clients.items():  # through both replicas, for two tenants
            r = c.post(
                "/v1/adapters",
                json={"name": f"job-{via}", "training_data": keyword_rows(20, seed=len(queued)),
                      "hyperparameters": FAST},
            )  # fmt: skip
            assert r.status_code == 202, r.text
            queued[r.json()["job"]["id"]] = c
        for job_id, c in queued.items():
            wait_job(c, job_id)

        with registry.session() as s:
            rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_([*queued, slow_id])))}
        host = socket.gethostname()
        workers = {f"{host}:{a.proc.pid}": "a", f"{host}:{b.proc.pid}": "b"}  # type: ignore[union-attr]
        assert rows[slow_id].claimed_by == f"{host}:{a.proc.pid}"  # type: ignore[union-attr]
        assert {j.attempts for j in rows.values()} == {1}  # none re-queued, none claimed twice
        assert {workers[j.claimed_by] for j in rows.values()} == {"a", "b"}  # type: ignore[index]
        logs = a.log_path.read_text() + b.log_path.read_text()
        for job_id in rows:  # trained exactly once, by one process
            assert logs.count(f"job {job_id}: training") == 1, job_id
    finally:
        for c in (locals().get("clients") or {}).values():
            c.close()
        a.stop()
        b.stop()
        registry.close()
