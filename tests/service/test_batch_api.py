"""Batch prediction jobs through the API on the tiny model: JSON lists and uploaded files (JSONL,
CSV, text), bad rows reported in place, results equal to online predictions, the version pinned,
progress, cancellation, and clear errors."""

import json

import pytest

from tests.adapters.test_data import parquet_bytes
from tests.datasets import keyword_rows
from tests.service.test_job_events import idle_client  # noqa: F401 - a fixture
from tests.service.test_predict_api import TEXTS, predict, trained
from tests.service.test_training_api import FAST, create, wait_job


def results(client, job_id):
    resp = client.get(f"/v1/jobs/{job_id}/results")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in resp.text.splitlines()]


def submit(client, adapter="tickets", **kw):
    resp = client.post(f"/v1/adapters/{adapter}/batch", **kw)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    job = wait_job(client, body["job"]["id"])
    assert job["status"] == "succeeded", job["error"]
    return body, job


def test_a_json_batch_matches_online_predictions_and_reports_bad_rows(app_client):
    trained(app_client)
    texts = TEXTS * 40  # 160 rows: several chunks
    inputs = [*texts[:3], "", 42, {"text": "x" * 20_000}, {"text": texts[3], "id": "row-7"}]
    inputs += texts[4:]
    body, job = submit(app_client, json={"inputs": inputs})
    assert body["rows"] == len(inputs)
    assert body["rows_failed"] == 3
    assert body["version"] == 1
    assert "row 4: empty text" in body["warnings"][0]
    assert job["kind"] == "predict"
    assert job["progress"]["rows_done"] == job["progress"]["rows"] == len(inputs)
    lines = results(app_client, job["id"])
    assert [line["row"] for line in lines] == list(range(1, len(inputs) + 1))
    assert lines[3]["error"] == "empty text"
    assert "no text" in lines[4]["error"]
    assert "characters exceed" in lines[5]["error"]
    assert lines[6]["id"] == "row-7"
    online = predict(app_client, "tickets", TEXTS).json()["predictions"]
    good = [line for line in lines if "prediction" in line]
    assert len(good) == len(inputs) - 3
    for line, text in zip(good, texts, strict=True):
        want = online[TEXTS.index(text)]
        assert line["prediction"]["label"] == want["label"]
        assert line["prediction"]["score"] == pytest.approx(want["score"], abs=1e-4)
    # the adapter can still train a new version while (or after) a batch job exists
    assert create(app_client, name="other").status_code == 202


@pytest.mark.parametrize(
    ("filename", "content", "ids"),
    [
        ("in.jsonl", '{"text": "refund my card", "id": 1}\n{"text": "login error"}\n'
                     "not json\n\"late parcel\"\n", [1, None, None, None]),
        ("in.csv", "id,text\na,refund my card\nb,login error\nc,\nd,late parcel\n",
         ["a", "b", "c", "d"]),
        ("in.txt", "refund my card\nlogin error\n\nlate parcel\n", [None, None, None]),
    ],
)  # fmt: skip
def test_uploaded_files_keep_their_rows_and_ids(app_client, filename, content, ids):
    trained(app_client)
    body, job = submit(app_client, files={"input_file": (filename, content.encode())})
    lines = results(app_client, job["id"])
    assert len(lines) == len(ids)
    assert [line.get("id") for line in lines] == ids
    bad = [line for line in lines if "error" in line]
    assert len(bad) == body["rows_failed"] == (1 if filename != "in.txt" else 0)
    assert all("label" in line["prediction"] for line in lines if "prediction" in line)


def test_a_parquet_file_with_ids(app_client):
    trained(app_client)
    raw = parquet_bytes({"id": [10, 11, 12], "text": ["refund my card", "", "late parcel"]})
    _body, job = submit(app_client, files={"input_file": ("in.parquet", raw)})
    lines = results(app_client, job["id"])
    assert [line["id"] for line in lines] == [10, 11, 12]
    assert lines[1]["error"] == "empty text"
    assert "prediction" in lines[0]
    assert "prediction" in lines[2]


def test_the_version_is_pinned_at_submission(app_client):
    trained(app_client)
    body = {"training_data": keyword_rows(20, seed=1), "hyperparameters": FAST, "promote": "always"}
    resp = app_client.post("/v1/adapters/tickets/versions", json=body)
    assert wait_job(app_client, resp.json()["job"]["id"])["status"] == "succeeded"
    assert app_client.get("/v1/adapters/tickets").json()["live_version"] == 2
    _body, job = submit(app_client, json={"inputs": TEXTS, "version": 1})
    assert job["version"] == 1
    got = [line["prediction"]["scores"] for line in results(app_client, job["id"])]
    want = predict(app_client, "tickets", TEXTS, version=1).json()["predictions"]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w["scores"], abs=1e-4)


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"inputs": []}, 422, "empty"),
        ({"inputs": ["", " "]}, 422, "no row can be predicted"),
        ({"inputs": TEXTS, "extra": 1}, 422, "unexpected fields"),
        ({"inputs": TEXTS, "version": 9}, 404, "version 9"),
        ({"inputs": TEXTS, "version": "two"}, 422, "integer"),
    ],
)
def test_bad_batches_are_clear_errors(app_client, body, status, detail):
    trained(app_client)
    resp = app_client.post("/v1/adapters/tickets/batch", json=body)
    assert resp.status_code == status, resp.text
    assert detail in resp.json()["detail"]
    assert app_client.post("/v1/adapters/nope/batch", json={"inputs": TEXTS}).status_code == 404
    resp = app_client.post(
        "/v1/adapters/tickets/batch", files={"input_file": ("x.csv", b"words\nhello\n")}
    )
    assert resp.status_code == 422
    assert "text column" in resp.json()["detail"]
    assert predict(app_client, "tickets", TEXTS).status_code == 200  # still serving


def test_results_only_for_finished_prediction_jobs(app_client):
    trained(app_client)
    training_job = app_client.get("/v1/jobs").json()["jobs"][0]["id"]
    resp = app_client.get(f"/v1/jobs/{training_job}/results")
    assert resp.status_code == 404
    assert "only prediction jobs" in resp.json()["detail"]


def test_a_queued_batch_job_can_be_cancelled_and_has_no_results(idle_client):  # noqa: F811
    runtime = idle_client.app.state.runtime
    # no job worker: train the adapter by running the queued job in this thread
    job_id = create(idle_client).json()["job"]["id"]
    assert runtime.jobs._claim() == job_id
    runtime.jobs._run(job_id)
    assert idle_client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    resp = idle_client.post("/v1/adapters/tickets/batch", json={"inputs": TEXTS})
    assert resp.status_code == 202
    batch_job = resp.json()["job"]["id"]
    resp = idle_client.get(f"/v1/jobs/{batch_job}/results")
    assert resp.status_code == 409
    assert "queued (0 of 4 rows done)" in resp.json()["detail"]
    assert idle_client.post(f"/v1/jobs/{batch_job}/cancel").json()["status"] == "cancelled"
    assert idle_client.get(f"/v1/jobs/{batch_job}/results").status_code == 409
    # the version it would have read is untouched by the cancellation
    assert idle_client.get("/v1/adapters/tickets").json()["versions"][0]["status"] == "ready"
