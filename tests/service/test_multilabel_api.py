"""A multi-label adapter through the API on the tiny model: train from JSON and from a CSV in the
long layout, predict label sets, the Open Inference Protocol tensors, feedback with label sets,
and the report's calibration."""

import json

from tests.adapters.test_data import parquet_bytes
from tests.datasets import multilabel_rows
from tests.service.test_training_api import FAST, wait_job

TEXTS = ["refund my card charge", "login password error tracking late", "hello"]


def train(client, name="tags", rows=None):
    body = {
        "name": name,
        "task": "multilabel",
        "training_data": rows or multilabel_rows(90),
        "hyperparameters": FAST,
    }
    resp = client.post("/v1/adapters", json=body)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    return resp.json()


def test_train_predict_infer_and_feedback(app_client):
    created = train(app_client)
    assert created["adapter"]["task"] == "multilabel"
    assert created["adapter"]["labels"] == ["billing", "login", "shipping"]
    version = app_client.get("/v1/adapters/tags").json()["versions"][0]
    assert "val_micro_f1" in version["metrics"] or version["report"]["winner"] == "probe"
    assert "val_micro_f1" in version["baseline"]
    calibration = version["report"]["calibration"]
    assert calibration["rows"] > 0
    assert isinstance(calibration["applied"], bool)

    resp = app_client.post("/v1/adapters/tags/predict", json={"inputs": TEXTS})
    assert resp.status_code == 200, resp.text
    predictions = resp.json()["predictions"]
    for p in predictions:
        assert set(p["scores"]) == {"billing", "login", "shipping"}
        assert isinstance(p["labels"], list)
        assert set(p["labels"]) <= set(p["scores"])
        # listed most confident first
        assert [p["scores"][x] for x in p["labels"]] == sorted(
            (p["scores"][x] for x in p["labels"]), reverse=True
        )
        assert "label" not in p

    infer = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]
    }
    resp = app_client.post("/v2/models/tags/infer", json=infer)
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o for o in resp.json()["outputs"]}
    assert outputs["labels"]["shape"] == [3]
    assert [json.loads(x) for x in outputs["labels"]["data"]] == [p["labels"] for p in predictions]
    assert outputs["predicted"]["shape"] == [3, 3]
    assert outputs["predicted"]["datatype"] == "BOOL"
    assert outputs["scores"]["shape"] == [3, 3]
    meta = app_client.get("/v2/models/tags").json()
    assert {o["name"] for o in meta["outputs"]} == {"labels", "predicted", "scores"}

    items = [{"text": TEXTS[0], "label": ["billing"]}, {"text": TEXTS[2], "label": []}]
    resp = app_client.post("/v1/adapters/tags/feedback", json={"items": items})
    assert resp.status_code == 202, resp.text
    live = app_client.get("/v1/adapters/tags/monitoring").json()
    assert live["live_accuracy"]["items"] == 2
    bad = [{"text": "x", "label": ["billing", "cooking"]}]
    resp = app_client.post("/v1/adapters/tags/feedback", json={"items": bad})
    assert resp.status_code == 422
    assert "'cooking' is not a label" in resp.json()["detail"]


def test_a_csv_in_the_long_layout_trains_with_its_rows_united(app_client):
    lines = ["text,label"]
    for row in multilabel_rows(90, seed=1):
        if not row["labels"]:
            lines.append(f"{row['text']},")
        for label in row["labels"]:  # one row per (text, label)
            lines.append(f"{row['text']},{label}")
    resp = app_client.post(
        "/v1/adapters",
        data={"name": "long", "task": "multilabel", "hyperparameters": json.dumps(FAST)},
        files={"training_file": ("tags.csv", "\n".join(lines).encode(), "text/csv")},
    )
    assert resp.status_code == 202, resp.text
    job = wait_job(app_client, resp.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    warnings = app_client.get("/v1/adapters/long").json()["versions"][0]["report"]["warnings"]
    assert any("united into one row" in w for w in warnings), warnings
    p = app_client.post("/v1/adapters/long/predict", json={"inputs": TEXTS}).json()
    assert len(p["predictions"]) == 3


def test_a_parquet_upload_with_label_ids_and_their_names(app_client):
    rows = multilabel_rows(90, seed=2)
    topics = ["billing", "login", "shipping"]
    raw = parquet_bytes({
        "text": [r["text"] for r in rows],
        "labels": [[topics.index(x) for x in r["labels"]] for r in rows],  # ids
    })  # fmt: skip
    resp = app_client.post(
        "/v1/adapters",
        data={"name": "ids", "task": "multilabel", "hyperparameters": json.dumps(FAST),
              "label_names": json.dumps(topics)},
        files={"training_file": ("tags.parquet", raw, "application/vnd.apache.parquet")},
    )  # fmt: skip
    assert resp.status_code == 202, resp.text
    assert resp.json()["adapter"]["labels"] == topics  # names, not ids
    job = wait_job(app_client, resp.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    scores = app_client.post("/v1/adapters/ids/predict", json={"inputs": TEXTS}).json()
    assert set(scores["predictions"][0]["scores"]) == set(topics)
