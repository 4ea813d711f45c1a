"""A training job survives the death of its server process (kill -9): re-queued, never stuck."""

import time

import pytest

from tests.datasets import keyword_rows
from tests.server import ServerProcess

pytestmark = pytest.mark.integration


def wait_for(client, job_id, predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if predicate(job):
            return job
        time.sleep(0.1)
    raise TimeoutError(job)


def test_killed_during_training_the_job_is_requeued_and_runs_again(tmp_path, tiny_bert_dir):
    data = tmp_path / "data"
    slow = {"epochs": 1000, "early_stopping": False, "learning_rate": 0.05, "batch_size": 8}
    with ServerProcess(data, base_model=tiny_bert_dir) as server, server.client() as c:
        resp = c.post(
            "/v1/adapters",
            json={"name": "slow", "training_data": keyword_rows(20), "hyperparameters": slow},
        )
        job_id = resp.json()["job"]["id"]
        adapter_id = resp.json()["adapter"]["id"]
        wait_for(c, job_id, lambda j: j["status"] == "running" and j["progress"].get("step", 0) > 3)
        server.proc.kill()  # SIGKILL: no drain, no cleanup
        server.proc.wait()

    with ServerProcess(data, base_model=tiny_bert_dir) as again, again.client() as c:
        job = wait_for(c, job_id, lambda j: j["attempts"] == 2 and j["status"] == "running")
        assert job["progress"].get("requeued") is True
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        job = wait_for(c, job_id, lambda j: j["status"] == "cancelled")
        adapter = c.get(f"/v1/adapters/{adapter_id}").json()
        assert adapter["versions"][0]["status"] == "cancelled"
        assert adapter["live_version"] is None
    # no version directory was ever published, and no staging leftovers remain visible
    published = [p for p in (data / "artifacts").rglob("manifest.json") if "/v" in str(p.parent)]
    assert all("datasets" in str(p) for p in published)


def test_sigterm_requeues_the_running_job_and_exits_cleanly(tmp_path, tiny_bert_dir):
    data = tmp_path / "data"
    slow = {"epochs": 1000, "early_stopping": False, "learning_rate": 0.05, "batch_size": 8}
    server = ServerProcess(data, base_model=tiny_bert_dir).start()
    try:
        with server.client() as c:
            resp = c.post(
                "/v1/adapters",
                json={"name": "slow", "training_data": keyword_rows(20), "hyperparameters": slow},
            )
            job_id = resp.json()["job"]["id"]
            wait_for(c, job_id, lambda j: j["status"] == "running")
            for _ in range(5):  # the API keeps answering while a job trains
                assert c.get("/readyz").status_code == 200
                assert c.get("/v1/adapters/slow").json()["status"] == "training"
        server.terminate()
        assert server.wait(60) == 0
    finally:
        server.stop()
    with ServerProcess(data, base_model=tiny_bert_dir, job_workers=0) as again, again.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued"  # handed back, not failed and not stuck in "running"
        assert job["attempts"] == 1
