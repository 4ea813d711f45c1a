"""The job event stream: every stored epoch exactly once (every fold's and the final fit's),
event ids and resuming with Last-Event-ID, keep-alives while a job waits; and what a small
(cross-validated) dataset leaves behind: its warnings and a reference profile for drift."""

import pytest
from loradock_client._transport import decode_sse

from tests.conftest import started_client
from tests.datasets import keyword_rows
from tests.service.test_predict_api import predict
from tests.service.test_training_api import FAST, create, wait_job


def stream(client, job_id, last_event_id=None, limit=None):
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    lines = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            lines.append(line)
            if limit is not None and limit(lines):
                break
    return lines


def small_dataset():
    """41 rows (under 50: 5-fold cross-validation, then a final fit), one an exact duplicate."""
    rows = keyword_rows(14)[:40]
    return [*rows, dict(rows[7])]


def test_a_small_dataset_streams_every_epoch_once_and_keeps_warnings_and_drift(app_client):
    s = app_client.app.state.runtime.settings
    s.drift_min_count, s.drift_check_every = 20, 20
    rows = small_dataset()
    resp = create(app_client, rows=rows, training_data=rows, hyperparameters={**FAST, "epochs": 3})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job"]["id"]
    events = list(decode_sse(stream(app_client, job_id)))
    job = wait_job(app_client, job_id)
    assert job["status"] == "succeeded", job

    epochs = [e for e in events if e.event == "epoch"]
    assert [e.data for e in epochs] == job["history"]  # all of it, each exactly once, in order
    ids = [e.id for e in epochs]
    assert ids == [f"1-{i}" for i in range(len(epochs))]
    runs = [e.data.get("fold", "final") for e in epochs]
    assert sorted(set(runs), key=str) == [1, 2, 3, 4, 5, "final"]
    for fold in range(1, 6):
        numbers = [e.data["epoch"] for e in epochs if e.data.get("fold") == fold]
        assert numbers == list(range(1, len(numbers) + 1)), fold
    final = [e.data for e in epochs if e.data.get("final_fit")]
    assert runs[-len(final) :] == ["final"] * len(final)  # the final fit comes last
    assert events[-1].event == "end"

    # Resuming after epoch 4 sends epochs 5.. only, then the end.
    resumed = list(decode_sse(stream(app_client, job_id, last_event_id=ids[4])))
    assert [e.data for e in resumed if e.event == "epoch"] == job["history"][5:]
    assert resumed[-1].event == "end"

    # The duplicate's warning survives training, in the version and in the monitoring report.
    version = app_client.get("/v1/adapters/tickets").json()["versions"][0]
    duplicate = "training_data: dropped 1 exact duplicate rows"
    assert duplicate in version["report"]["warnings"]
    report = app_client.get("/v1/adapters/tickets/monitoring").json()
    assert duplicate in report["training"]["warnings"]
    assert report["training"]["history"] == job["history"]

    # Cross-validated adapters get a reference profile: drift is scored after predictions.
    texts = [r["text"] for r in keyword_rows(10, seed=9)]
    assert predict(app_client, "tickets", texts).status_code == 200
    drift = app_client.get("/v1/adapters/tickets/monitoring").json()["drift"]
    assert drift["status"] == "scored", drift
    assert {"input_length", "predicted_label", "confidence", "embedding"} <= set(drift["signals"])
    assert drift["signals"]["embedding"]["reference_rows"] == 40  # every row, out of fold


@pytest.fixture
def idle_client(settings, metrics):
    """A server that trains nothing (job_workers=0), with quick keep-alives."""
    with started_client(
        settings.model_copy(update={"job_workers": 0, "events_keepalive_seconds": 0.2}), metrics
    ) as client:
        yield client


def test_a_queued_job_gets_keep_alives_so_proxies_keep_the_stream(idle_client):
    job_id = create(idle_client).json()["job"]["id"]
    lines = stream(idle_client, job_id, limit=lambda ls: ls.count(": keep-alive") >= 3)
    events = list(decode_sse(lines))
    assert [e.event for e in events][:1] == ["status"]
    assert events[0].data["status"] == "queued"
    assert lines.count(": keep-alive") >= 3
    assert idle_client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_another_tenants_job_stream_is_404_before_streaming(app_client):
    job_id = create(app_client).json()["job"]["id"]
    tenant = app_client.post("/v1/tenants", json={"name": "other"}).json()
    key = app_client.post(f"/v1/tenants/{tenant['id']}/keys", json={"scopes": ["predict"]})
    other = {"Authorization": f"Bearer {key.json()['key']}"}
    resp = app_client.get(f"/v1/jobs/{job_id}/events", headers=other)
    assert resp.status_code == 404
    assert resp.headers["content-type"].startswith("application/problem+json")
