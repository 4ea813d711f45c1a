"""Training through the API, in-process on the tiny BERT: create, follow, promote, delete."""

import io
import json
import time
import zipfile

import pytest
from fastapi.testclient import TestClient

from loradock.service.db.models import Job, new_id, utcnow
from tests.datasets import keyword_rows
from tests.service.test_app import assert_problem

FAST = {"learning_rate": 0.05, "init_head_l2": 0.001, "batch_size": 8, "epochs": 4}


def wait_job(client, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise TimeoutError(job)


def create(client, name="tickets", rows=None, **extra):
    body = {"name": name, "training_data": rows or keyword_rows(20), "hyperparameters": FAST}
    body.update(extra)
    return client.post("/v1/adapters", json=body)


def store_keys(client):
    return client.app.state.runtime.store.list_keys()


def test_create_train_and_serve_metadata(app_client):
    resp = create(app_client)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["adapter"]["status"] == "training"
    assert body["adapter"]["labels"] == ["billing", "login", "shipping"]
    assert body["job"]["status"] in ("queued", "running")
    job = wait_job(app_client, body["job"]["id"])
    assert job["status"] == "succeeded", job
    assert job["stop_reason"] in ("early_stopping", "max_epochs")
    assert job["attempts"] == 1
    assert job["history"]

    adapter = app_client.get("/v1/adapters/tickets").json()
    assert adapter["id"] == body["adapter"]["id"]
    assert adapter["status"] == "ready"
    assert adapter["live_version"] == 1
    version = adapter["versions"][0]
    assert version["status"] == "ready"
    assert version["live"] is True
    for key in (
        "best_epoch",
        "stop_reason",
        "epochs_run",
        "val_loss",
        "val_accuracy",
        "val_macro_f1",
    ):
        assert key in version["metrics"]
    assert version["baseline"]["kind"] == "linear_probe"
    assert version["report"]["winner"] in ("lora", "probe")
    assert version["report"]["promotion"]["promoted"] is True
    for record in version["history"]:
        assert {"epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1"} <= set(record)
    key = f"{adapter_id_tenant(app_client)}/{adapter['id']}/v1"
    assert key in store_keys(app_client)
    assert app_client.get(f"/v1/adapters/{adapter['id']}/versions/1").json()["version"] == 1
    listed = app_client.get("/v1/adapters").json()["adapters"]
    assert [a["name"] for a in listed] == ["tickets"]


def adapter_id_tenant(client):
    return client.get("/v1/tenants").json()["tenants"][0]["id"]


def test_multipart_csv_and_jsonl_uploads(app_client):
    rows = keyword_rows(20)
    csv_text = "text,label\n" + "\n".join(f'"{r["text"]}",{r["label"]}' for r in rows)
    resp = app_client.post(
        "/v1/adapters",
        data={"name": "from-csv", "task": "classification", "hyperparameters": json.dumps(FAST)},
        files={"training_file": ("train.csv", csv_text.encode(), "text/csv")},
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["adapter"]["labels"] == ["billing", "login", "shipping"]
    jsonl = "\n".join(json.dumps(r) for r in rows).encode()
    resp = app_client.post(
        "/v1/adapters",
        data={"name": "from-jsonl", "promote": "never"},
        files={"training_file": ("train.jsonl", jsonl, "application/x-ndjson")},
    )
    assert resp.status_code == 202, resp.text
    for job in app_client.get("/v1/jobs").json()["jobs"]:
        assert wait_job(app_client, job["id"])["status"] == "succeeded"
    never = app_client.get("/v1/adapters/from-jsonl").json()
    assert never["live_version"] is None  # promote=never
    assert never["versions"][0]["status"] == "ready"


@pytest.mark.parametrize(
    ("rows", "detail"),
    [
        ([{"text": "", "label": "a"}, *keyword_rows(3)], "row 1 field 'text': empty text"),
        ([*keyword_rows(3), {"text": "hello"}], "row 10 field 'label': missing label"),
        ([{"text": f"t{i}", "label": "same"} for i in range(10)], "at least 2 are needed"),
        ([*keyword_rows(3), {"text": "lonely", "label": "other"}], "'other' (1)"),
        ([{"text": "x" * 20000, "label": "a"}, *keyword_rows(3)], "exceed the limit of 10000"),
        ([], "0 rows"),
    ],
)
def test_invalid_datasets_are_422_naming_the_row(app_client, rows, detail):
    body = assert_problem(create(app_client, rows=rows or None, training_data=rows), 422, detail)
    assert body["errors"]
    assert app_client.get("/v1/adapters").json()["adapters"] == []  # nothing was created
    assert store_keys(app_client) == []


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"task": "translation"}, "task"),
        ({"hyperparameters": {"rank": 0}}, "hyperparameters.rank"),
        ({"hyperparameters": {"learning_rate": "fast"}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"nonsense": 1}}, "hyperparameters.nonsense"),
        ({"validation_split": 0.9}, "validation_split"),
        ({"name": "bad name!"}, "name"),
        ({"promote": "sometimes"}, "promote"),
    ],
)
def test_invalid_options_are_422(app_client, extra, where):
    assert_problem(create(app_client, **extra), 422, where)


def test_malformed_json_is_422(app_client):
    resp = app_client.post(
        "/v1/adapters",
        content=b'{"name": "x", "training_data": [',
        headers={"content-type": "application/json"},
    )
    assert_problem(resp, 422, "not valid JSON")


def test_unknown_validation_labels_are_422(app_client):
    val = [{"text": "refund now", "label": "billing"}, {"text": "what", "label": "mystery"}]
    assert_problem(create(app_client, validation_data=val), 422, "validation_data row 2")


def test_duplicate_name_is_409(app_client):
    assert create(app_client).status_code == 202
    assert_problem(create(app_client), 409, "already exists")


def test_adapter_limit_per_tenant(app_client):
    app_client.app.state.runtime.settings.max_adapters_per_tenant = 1
    assert create(app_client, name="one").status_code == 202
    assert_problem(create(app_client, name="two"), 409, "LORADOCK_MAX_ADAPTERS_PER_TENANT")


def test_divergence_fails_the_job_and_publishes_nothing(app_client):
    hp = {"learning_rate": 10.0, "batch_size": 4, "epochs": 5}
    job_id = create(app_client, hyperparameters=hp).json()["job"]["id"]
    job = wait_job(app_client, job_id)
    assert job["status"] == "failed"
    assert job["stop_reason"] == "diverged"
    assert "loss" in job["error"]
    adapter = app_client.get("/v1/adapters/tickets").json()
    assert adapter["status"] == "failed"
    assert adapter["versions"][0]["status"] == "failed"
    assert not [k for k in store_keys(app_client) if "/v1" in k.rsplit("/", 1)[-1:][0][:2]]
    assert all("/datasets/" in k for k in store_keys(app_client))


def test_cancel_publishes_nothing(app_client):
    slow = {**FAST, "epochs": 500, "early_stopping": False}
    job_id = create(app_client, hyperparameters=slow).json()["job"]["id"]
    resp = app_client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202
    job = wait_job(app_client, job_id)
    assert job["status"] == "cancelled"
    assert job["stop_reason"] == "cancelled"
    assert all("/datasets/" in k for k in store_keys(app_client))
    assert app_client.get("/v1/adapters/tickets").json()["versions"][0]["status"] == "cancelled"
    assert_problem(app_client.post(f"/v1/jobs/{job_id}/cancel"), 409, "already cancelled")


def test_events_stream_until_the_job_ends(app_client):
    job_id = create(app_client).json()["job"]["id"]
    events = []
    with app_client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
    assert events[0] == "status"
    assert "epoch" in events
    assert events[-1] == "end"
    # the final status comes after every epoch: a client may stop listening when it sees it
    assert events[-2] == "status"
    assert events.index("epoch") < len(events) - 2


def test_retrain_promote_and_rollback(app_client):
    first = create(app_client).json()
    wait_job(app_client, first["job"]["id"])
    body = {"training_data": keyword_rows(20, seed=5), "hyperparameters": FAST, "promote": "never"}
    second = app_client.post("/v1/adapters/tickets/versions", json=body)
    assert second.status_code == 202, second.text
    assert second.json()["job"]["version"] == 2
    wait_job(app_client, second.json()["job"]["id"])
    adapter = app_client.get("/v1/adapters/tickets").json()
    assert adapter["live_version"] == 1
    assert [v["status"] for v in adapter["versions"]] == ["ready", "ready"]
    promoted = app_client.post("/v1/adapters/tickets/versions/2/promote")
    assert promoted.status_code == 200
    assert promoted.json()["live_version"] == 2
    rolled = app_client.post("/v1/adapters/tickets/versions/1/promote")
    assert rolled.json()["live_version"] == 1
    assert_problem(app_client.post("/v1/adapters/tickets/versions/9/promote"), 404, "no version 9")


def test_one_training_job_per_adapter_at_a_time(app_client):
    slow = {**FAST, "epochs": 500, "early_stopping": False}
    job_id = create(app_client, hyperparameters=slow).json()["job"]["id"]
    body = {"training_data": keyword_rows(20), "hyperparameters": FAST}
    assert_problem(
        app_client.post("/v1/adapters/tickets/versions", json=body), 409, "already training"
    )
    app_client.post(f"/v1/jobs/{job_id}/cancel")
    wait_job(app_client, job_id)


def test_download_is_a_zip_with_manifest(app_client):
    wait_job(app_client, create(app_client).json()["job"]["id"])
    resp = app_client.get("/v1/adapters/tickets/download")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(resp.content))
    names = set(archive.namelist())
    assert {"manifest.json", "head.safetensors", "loradock.json", "reference.json"} <= names
    # every hyperparameter used is recorded, the defaults too (not only those given)
    recorded = json.loads(archive.read("loradock.json"))["hyperparameters"]
    assert recorded["learning_rate"] == FAST["learning_rate"]
    assert recorded["rank"] == 8
    assert recorded["weight_decay"] == 0.01
    assert_problem(app_client.get("/v1/adapters/tickets/download?version=7"), 404)


def test_delete_removes_rows_and_artifacts(app_client):
    wait_job(app_client, create(app_client).json()["job"]["id"])
    assert store_keys(app_client)
    assert app_client.delete("/v1/adapters/tickets").status_code == 204
    assert_problem(app_client.get("/v1/adapters/tickets"), 404)
    assert store_keys(app_client) == []
    assert app_client.get("/v1/jobs").json()["jobs"] == []
    assert_problem(app_client.delete("/v1/adapters/tickets"), 404)


def test_tenants_never_see_each_other(app_client):
    created = create(app_client).json()
    adapter_id, job_id = created["adapter"]["id"], created["job"]["id"]
    wait_job(app_client, job_id)
    tenant = app_client.post("/v1/tenants", json={"name": "other"}).json()
    key = app_client.post(f"/v1/tenants/{tenant['id']}/keys", json={"scopes": ["train"]}).json()
    other = TestClient(app_client.app, headers={"Authorization": f"Bearer {key['key']}"})
    assert other.get("/v1/adapters").json()["adapters"] == []
    for ref in (adapter_id, "tickets"):
        assert_problem(other.get(f"/v1/adapters/{ref}"), 404)
        assert_problem(other.delete(f"/v1/adapters/{ref}"), 404)
        assert_problem(other.get(f"/v1/adapters/{ref}/versions/1"), 404)
        assert_problem(other.post(f"/v1/adapters/{ref}/versions/1/promote"), 404)
        assert_problem(other.get(f"/v1/adapters/{ref}/download"), 404)
        body = {"training_data": keyword_rows(5)}
        assert_problem(other.post(f"/v1/adapters/{ref}/versions", json=body), 404)
    assert_problem(other.get(f"/v1/jobs/{job_id}"), 404)
    assert_problem(other.get(f"/v1/jobs/{job_id}/events"), 404)
    assert_problem(other.post(f"/v1/jobs/{job_id}/cancel"), 404)
    assert other.get("/v1/jobs").json()["jobs"] == []
    # the same name is free in the other tenant
    assert create(other).status_code == 202
    assert app_client.get("/v1/adapters/tickets").json()["id"] == adapter_id


def test_predict_keys_read_but_cannot_train(app_client):
    wait_job(app_client, create(app_client).json()["job"]["id"])
    tenant_id = adapter_id_tenant(app_client)
    key = app_client.post(f"/v1/tenants/{tenant_id}/keys", json={"scopes": ["predict"]}).json()
    reader = TestClient(app_client.app, headers={"Authorization": f"Bearer {key['key']}"})
    assert reader.get("/v1/adapters/tickets").status_code == 200
    assert_problem(create(reader, name="nope"), 403, "'train' scope")
    assert_problem(reader.delete("/v1/adapters/tickets"), 403)
    assert_problem(reader.post("/v1/adapters/tickets/versions/1/promote"), 403)


def test_interrupted_jobs_are_requeued_or_failed_on_start(app_client):
    runtime = app_client.app.state.runtime
    created = create(app_client).json()
    wait_job(app_client, created["job"]["id"])
    with runtime.db.session() as s:
        for attempts in (1, 3):
            s.add(Job(id=new_id("job"), tenant_id=adapter_id_tenant(app_client),
                      adapter_id=created["adapter"]["id"], version=10 + attempts,
                      status="running", attempts=attempts, created_at=utcnow()))  # fmt: skip
    runtime.jobs.stop()  # as if the process had died: nothing is claiming jobs now
    requeued, failed = runtime.jobs.recover()
    assert (requeued, failed) == (1, 1)
    statuses = sorted(
        (j["attempts"], j["status"]) for j in app_client.get("/v1/jobs").json()["jobs"]
    )
    assert (1, "queued") in statuses
    assert (3, "failed") in statuses
    assert "running" not in [s for _, s in statuses]


def test_if_better_promotion_follows_the_validation_comparison(app_client):
    from loradock.adapters.tasks import Classification
    from loradock.adapters.training.served import served_metrics

    wait_job(app_client, create(app_client).json()["job"]["id"])
    body = {"training_data": keyword_rows(20, seed=3), "hyperparameters": FAST}
    job = app_client.post("/v1/adapters/tickets/versions", json=body).json()["job"]
    wait_job(app_client, job["id"])
    adapter = app_client.get("/v1/adapters/tickets").json()
    v1, v2 = adapter["versions"]

    def served(v):
        return served_metrics(v["metrics"], v["baseline"], v["report"]["winner"])

    expected = Classification.better(served(v2), served(v1))
    promotion = v2["report"]["promotion"]
    assert promotion["promoted"] is expected
    assert adapter["live_version"] == (2 if expected else 1)
    assert "live version 1" in promotion["reason"]
    assert v2["metrics"]["winner"] == v2["report"]["winner"]


@pytest.mark.parametrize(
    ("new", "live", "task", "expected"),
    [
        ({"val_macro_f1": 0.8}, {"val_macro_f1": 0.7}, "classification", True),
        ({"val_macro_f1": 0.7}, {"val_macro_f1": 0.7}, "classification", False),
        ({"val_macro_f1": 0.6}, {"val_macro_f1": 0.7}, "classification", False),
        ({"val_loss": 0.2}, {"val_loss": 0.3}, "regression", True),
        ({"val_loss": 0.4}, {"val_loss": 0.3}, "regression", False),
        ({"val_macro_f1": 0.5}, {}, "classification", True),
        ({}, {"val_macro_f1": 0.5}, "classification", False),
    ],
)
def test_better_than(new, live, task, expected):
    from loradock.adapters import tasks

    assert tasks.get(task).better(new, live) is expected


def test_regression_through_the_api(app_client):
    from tests.datasets import regression_rows

    resp = create(app_client, name="score", task="regression", rows=regression_rows(80),
                  training_data=regression_rows(80))  # fmt: skip
    assert resp.status_code == 202, resp.text
    assert resp.json()["adapter"]["labels"] == []
    job = wait_job(app_client, resp.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    version = app_client.get("/v1/adapters/score/versions/1").json()
    assert {"val_loss", "val_mse", "val_mae", "val_r2"} <= set(version["metrics"])
    assert_problem(
        create(app_client, name="bad", task="regression", training_data=keyword_rows(5)),
        422, "finite number",
    )  # fmt: skip


def test_deleting_an_adapter_while_it_trains_leaves_nothing_and_the_worker_goes_on(app_client):
    slow = {**FAST, "epochs": 500, "early_stopping": False}
    job_id = create(app_client, hyperparameters=slow).json()["job"]["id"]
    deadline = time.monotonic() + 30
    while app_client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert app_client.delete("/v1/adapters/tickets").status_code == 204
    assert_problem(app_client.get(f"/v1/jobs/{job_id}"), 404)
    # the worker drops the cancelled job and trains the next one
    nxt = create(app_client, name="next").json()["job"]["id"]
    assert wait_job(app_client, nxt)["status"] == "succeeded"
    keys = store_keys(app_client)
    assert keys
    assert all("/" + app_client.get("/v1/adapters/next").json()["id"] + "/" in k for k in keys)


def test_one_conflicting_text_costs_a_warning_not_the_dataset(app_client):
    rows = keyword_rows(20)
    rows.append({"text": rows[5]["text"], "label": "login" if rows[5]["label"] != "login"
                 else "billing"})  # fmt: skip
    refused = create(app_client, rows=rows, training_data=rows, on_conflict="reject")
    assert_problem(refused, 422, f"row {len(rows)} field 'label': same text as row 6")
    resp = create(app_client, rows=rows, training_data=rows)
    assert resp.status_code == 202, resp.text
    job = wait_job(app_client, resp.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    version = app_client.get("/v1/adapters/tickets/versions/1").json()
    [warning] = [w for w in version["report"]["warnings"] if "conflicting labels" in w]
    assert f"dropped 2 rows of 1 texts with conflicting labels: rows 6, {len(rows)}" in warning
