"""Per-tenant job limits: a bounded queue per tenant (429) and fair, capped claiming."""

import pytest
from fastapi.testclient import TestClient

from loradock.service.jobs import JobRunner
from loradock.service.settings import Settings
from tests.service.test_app import assert_problem
from tests.service.test_training_api import create, store_keys


@pytest.fixture
def settings(tmp_path, tiny_bert_dir):
    # No workers: queued jobs stay queued, so the limits can be observed exactly.
    return Settings(
        data_dir=tmp_path / "data",
        base_model=tiny_bert_dir,
        job_workers=0,
        max_queued_jobs_per_tenant=2,
    )


def other_tenant(client, name="other", scopes=("train",)):
    tenant = client.post("/v1/tenants", json={"name": name}).json()
    key = client.post(f"/v1/tenants/{tenant['id']}/keys", json={"scopes": list(scopes)}).json()
    return TestClient(client.app, headers={"Authorization": f"Bearer {key['key']}"})


def test_a_full_tenant_queue_answers_429_and_stores_nothing(app_client):
    first = create(app_client, name="a")
    assert first.status_code == 202
    assert create(app_client, name="b").status_code == 202
    keys = store_keys(app_client)
    resp = create(app_client, name="c")
    body = assert_problem(resp, 429, "LORADOCK_MAX_QUEUED_JOBS_PER_TENANT")
    assert int(resp.headers["Retry-After"]) > 0
    assert "2 jobs waiting" in body["detail"]
    # nothing of the refused request exists: no adapter row, no stored dataset
    assert_problem(app_client.get("/v1/adapters/c"), 404)
    assert store_keys(app_client) == keys
    # another tenant has its own queue
    assert create(other_tenant(app_client), name="c").status_code == 202
    # cancelling a queued job frees a place
    assert app_client.post(f"/v1/jobs/{first.json()['job']['id']}/cancel").status_code == 202
    assert create(app_client, name="c").status_code == 202


def test_claims_are_fair_across_tenants_and_capped_per_tenant(app_client):
    app_client.app.state.runtime.settings.max_queued_jobs_per_tenant = 10
    busy = [create(app_client, name=f"a{i}").json()["job"]["id"] for i in range(3)]
    quiet = create(other_tenant(app_client), name="b").json()["job"]["id"]
    runner = JobRunner(
        app_client.app.state.runtime.db, store=None, base=None, max_running_per_tenant=1
    )
    # the oldest job first; then the busy tenant is at its cap, so the other tenant's job goes
    assert runner._claim() == busy[0]
    assert runner._claim() == quiet
    assert runner._claim() is None  # both tenants are at their cap of 1 running job
    runner.max_running_per_tenant = 2
    assert runner._claim() == busy[1]
    assert runner._claim() is None
    jobs = {j["id"]: j["status"] for j in app_client.get("/v1/jobs").json()["jobs"]}
    assert [jobs[j] for j in busy] == ["running", "running", "queued"]
