"""Storage and state safety (issue 13): datasets live only as long as their job, a per-tenant
quota, orphans swept at start-up, a lost registry never silently replaced, job budgets, and a
registry that cannot be read takes the replica out of readiness."""

import time

from fastapi.testclient import TestClient

from loradock.service.app import create_app
from loradock.service.runtime import Phase
from loradock.service.storage import tenant_usage
from tests.conftest import started_client
from tests.datasets import keyword_rows
from tests.service.test_app import assert_problem
from tests.service.test_predict_api import trained
from tests.service.test_training_api import FAST, create, store_keys, wait_job


def datasets(client):
    return [k for k in store_keys(client) if "/datasets/" in k]


def datasets_soon(client, timeout=10.0):
    """The datasets left once the worker has cleaned up: it deletes a job's dataset just after
    recording the job's end (in that order, so a crash in between retries with the data)."""
    deadline = time.monotonic() + timeout
    while (left := datasets(client)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def test_a_jobs_dataset_is_deleted_when_the_job_ends(app_client):
    trained(app_client)
    assert datasets_soon(app_client) == []
    assert len(store_keys(app_client)) == 1  # the trained version only
    # a failed job (diverged) and a cancelled one keep nothing either
    bad = create(app_client, name="bad", hyperparameters={"learning_rate": 10, "epochs": 3})
    wait_job(app_client, bad.json()["job"]["id"])
    assert datasets_soon(app_client) == []


def test_a_cancelled_queued_job_leaves_no_dataset(settings, metrics):
    settings.job_workers = 0
    with started_client(settings, metrics) as c:
        job = create(c).json()["job"]["id"]
        assert len(datasets(c)) == 1  # kept while the job may run
        assert c.post(f"/v1/jobs/{job}/cancel").status_code == 202
        assert datasets(c) == []


def test_the_storage_quota_is_413_naming_the_usage(settings, metrics):
    settings.max_storage_bytes_per_tenant = 20_000
    with started_client(settings, metrics) as c:
        trained(c)  # fits
        tenant = c.get("/v1/tenants").json()["tenants"][0]["id"]
        used = tenant_usage(c.app.state.runtime.store, tenant)
        assert 0 < used < 20_000
        rows = keyword_rows(200)
        resp = create(c, name="more", rows=rows, training_data=rows)
        body = assert_problem(resp, 413, f"this tenant stores {used} bytes")
        assert "LORADOCK_MAX_STORAGE_BYTES_PER_TENANT" in body["detail"]
        assert [a["name"] for a in c.get("/v1/adapters").json()["adapters"]] == ["tickets"]


def test_start_up_sweeps_what_no_registry_row_refers_to(settings, metrics):
    with started_client(settings, metrics) as c:
        trained(c)
        # The finished job's dataset goes just after the job reports success: wait for it.
        deadline = time.monotonic() + 30
        while any("/datasets/" in k for k in store_keys(c)) and time.monotonic() < deadline:
            time.sleep(0.05)
        keys = store_keys(c)
        assert not any("/datasets/" in k for k in keys)
        store = c.app.state.runtime.store
        tenant = keys[0].split("/")[0]
        # a publish whose registry write never committed, and a dataset of a job that is gone
        store.publish(f"{tenant}/ad_orphan/v1", {"x.json": b"{}"})
        store.publish(f"{tenant}/{keys[0].split('/')[1]}/datasets/job_gone", {"d.json": b"[]"})
        assert len(store_keys(c)) == 3
    with started_client(settings, metrics) as c:
        assert store_keys(c) == keys
        assert c.post("/v1/adapters/tickets/predict", json={"inputs": ["x"]}).status_code == 200


def test_batch_results_survive_restarts_while_their_job_exists(settings, metrics):
    with started_client(settings, metrics) as c:
        trained(c)
        job = c.post("/v1/adapters/tickets/batch", json={"inputs": ["refund", "login"]}).json()
        job_id = job["job"]["id"]
        assert wait_job(c, job_id)["status"] == "succeeded"
        first = c.get(f"/v1/jobs/{job_id}/results").text
        adapter = c.get("/v1/adapters/tickets").json()["id"]
        tenant = store_keys(c)[0].split("/")[0]
        store = c.app.state.runtime.store
        store.publish(f"{tenant}/{adapter}/batches/job_gone", {"predictions.jsonl": b"{}\n"})
        assert datasets(c) == []  # the inputs went when the job ended
    with started_client(settings, metrics) as c:
        keys = store_keys(c)
        assert f"{tenant}/{adapter}/batches/{job_id}" in keys  # its job exists: kept
        assert f"{tenant}/{adapter}/batches/job_gone" not in keys  # no job: swept
        assert c.get(f"/v1/jobs/{job_id}/results").text == first


def test_a_lost_registry_is_not_replaced_and_the_key_file_is_kept(settings, metrics):
    with started_client(settings, metrics) as c:
        trained(c)
        key = c.admin_key
    (settings.data_dir / "loradock.db").unlink()
    app = create_app(settings, metrics=metrics)
    with TestClient(app):
        runtime = app.state.runtime
        assert runtime.wait_until_settled(60) is Phase.FAILED
        assert "registry is empty" in runtime.error
        assert "LORADOCK_ALLOW_REBOOTSTRAP" in runtime.error
    assert (settings.data_dir / "bootstrap-key").read_text().strip() == key
    settings.allow_rebootstrap = True
    with started_client(settings, metrics) as c:
        assert c.admin_key != key
        kept = list(settings.data_dir.glob("bootstrap-key.*.old"))
        assert [p.read_text().strip() for p in kept] == [key]


def test_a_job_over_its_compute_budget_fails_saying_so(settings, metrics):
    settings.job_max_seconds = 0.3
    with started_client(settings, metrics) as c:
        rows = keyword_rows(60)
        slow = {**FAST, "epochs": 200, "early_stopping": False, "batch_size": 2}
        resp = create(c, rows=rows, training_data=rows, hyperparameters=slow)
        job = wait_job(c, resp.json()["job"]["id"])
    assert job["status"] == "failed"
    assert job["stop_reason"] == "budget"
    assert "compute budget of 0.3 s" in job["error"]
    assert "LORADOCK_JOB_MAX_SECONDS" in job["error"]


def test_readiness_fails_while_the_registry_cannot_be_read(app_client):
    runtime = app_client.app.state.runtime
    assert app_client.get("/readyz").json()["registry"] == "ok"
    (runtime.settings.data_dir / "loradock.db").unlink()
    runtime.db.engine.dispose()  # new connections find no database
    runtime._registry_checked_at = float("-inf")
    resp = app_client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["registry"] == "the registry database is missing or unreadable"
    resp = app_client.get("/v1/adapters")
    assert_problem(resp, 503, "the registry database is missing or unreadable")
