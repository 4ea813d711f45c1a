"""What the client sends for each resource method (seen by a real local HTTP server)."""

import json
from urllib.parse import parse_qs

import pytest
from loradock_client import Client, TrainingFailed, TrainingResult

from tests.clients import samples
from tests.clients.fake_server import FakeServer, Reply

ROWS = [
    {"text": "refund my card", "label": "billing"},
    {"text": "reset password", "label": "login"},
]
STARTED = {"adapter": samples.adapter(live=None, status="training"), "job": samples.job("queued")}


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


@pytest.fixture
def client(server):
    with Client(server.url, "k") as c:
        yield c


def test_create_with_rows_sends_json_and_returns_at_once_without_wait(server, client):
    server.on("POST", "/v1/adapters", Reply(202, STARTED))
    started = client.adapters.create(
        "tickets",
        training_data=ROWS,
        validation_data=ROWS,
        hyperparameters={"epochs": 3},
        promote="never",
        on_conflict="reject",
        wait=False,
    )
    assert isinstance(started, TrainingResult)
    assert started.job.status == "queued"
    assert started.adapter.status == "training"
    (sent,) = server.hits("POST", "/v1/adapters")
    assert sent.headers["content-type"] == "application/json"
    assert sent.json() == {  # no task: the server's base picks its default
        "name": "tickets",
        "training_data": ROWS,
        "validation_data": ROWS,
        "hyperparameters": {"epochs": 3},
        "promote": "never",
        "on_conflict": "reject",
    }
    assert server.hits("GET", "/v1/jobs/job_1/events") == []


def test_create_with_a_file_sends_multipart(server, client, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\nrefund,billing\nlogin fails,login\n")
    server.on("POST", "/v1/adapters", Reply(202, STARTED))
    client.adapters.create(
        "tickets",
        "regression",
        training_file=train,
        validation_data=ROWS,
        validation_split=0.3,
        hyperparameters={"rank": 4},
        wait=False,
    )
    (sent,) = server.hits("POST", "/v1/adapters")
    assert sent.headers["content-type"].startswith("multipart/form-data")
    form = sent.form()
    assert form["training_file"] == ("train.csv", train.read_bytes(), "text/csv")
    name, content, _ = form["validation_file"]  # rows next to a file travel as JSONL
    assert name == "validation.jsonl"
    assert [json.loads(line) for line in content.decode().splitlines()] == ROWS
    assert form["name"][1] == b"tickets"
    assert form["task"][1] == b"regression"
    assert json.loads(form["hyperparameters"][1]) == {"rank": 4}
    assert form["validation_split"][1] == b"0.3"
    assert form["promote"][1] == b"if_better"
    assert form["on_conflict"][1] == b"drop"


def test_create_needs_exactly_one_training_set(client, tmp_path):
    with pytest.raises(TypeError, match="exactly one"):
        client.adapters.create("t")
    with pytest.raises(TypeError, match="exactly one"):
        client.adapters.create("t", training_data=ROWS, training_file=tmp_path / "x.jsonl")


def test_create_waits_for_the_job_and_summarises_it(server, client):
    server.on("POST", "/v1/adapters", Reply(202, STARTED))
    server.on("GET", "/v1/jobs/job_1/events", Reply(events=samples.job_events()))
    server.on("GET", "/v1/adapters/ad_1", Reply(200, samples.adapter()))
    events = []
    result = client.adapters.create("tickets", training_data=ROWS, on_event=events.append)
    assert result.job.status == "succeeded"
    assert result.promoted
    assert result.version is not None
    assert result.version.baseline.kind == "linear_probe"
    assert [e.event for e in events].count("epoch") == 3
    text = str(result)
    assert "epochs run: 3, stop reason: early_stopping, best epoch: 2" in text
    assert "linear probe" in text
    assert "0.7900" in text
    assert "0.6800" in text


def test_a_failed_job_raises_training_failed_with_the_result(server, client):
    failed = samples.job("failed", error="training diverged: loss is nan", stop_reason="diverged")
    server.on("POST", "/v1/adapters/tickets/versions", Reply(202, STARTED))
    server.on("GET", "/v1/jobs/job_1/events", Reply(events=samples.job_events(failed)))
    server.on("GET", "/v1/adapters/ad_1", Reply(200, samples.adapter()))
    with pytest.raises(TrainingFailed, match="diverged") as err:
        client.adapters.retrain("tickets", training_data=ROWS, progress=False)
    assert err.value.result.job.status == "failed"
    assert err.value.result.adapter.live_version == 1


def test_read_calls_and_their_paths(server, client):
    server.on("GET", "/v1/adapters", Reply(200, {"adapters": [samples.adapter()]}))
    server.on("GET", "/v1/adapters/my%20name", Reply(200, samples.adapter()))
    server.on("DELETE", "/v1/adapters/tickets", Reply(204))
    server.on("GET", "/v1/adapters/tickets/versions/1", Reply(200, samples.version()))
    server.on("POST", "/v1/adapters/tickets/versions/1/promote", Reply(200, samples.adapter()))
    server.on("GET", "/v1/jobs", Reply(200, {"jobs": [samples.job()]}))
    server.on("GET", "/v1/adapters/tickets/monitoring", Reply(200, {"flags": ["drift"], "new": 1}))
    assert client.adapters.list()[0].labels == ["billing", "login"]
    assert client.adapters.get("my name").id == "ad_1"  # path segments are escaped
    assert client.adapters.delete("tickets") is None
    version = client.versions.get("tickets", 1)
    assert version.metrics.stop_reason == "early_stopping"
    assert version.history[1].val_loss == 0.6
    assert client.versions.promote("tickets", 1).live_version == 1
    assert client.jobs.list(adapter="tickets")[0].progress.fraction == pytest.approx(6 / 40)
    report = client.adapters.monitoring("tickets")
    assert report.flags == ["drift"]
    assert report.model_extra == {"new": 1}
    assert parse_qs(server.hits("GET", "/v1/jobs")[0].query) == {
        "adapter": ["tickets"], "limit": ["100"], "view": ["full"]
    }  # fmt: skip


def test_predict_feedback_tenants_and_keys_bodies(server, client):
    server.on("POST", "/v1/adapters/tickets/predict", Reply(200, samples.prediction(["billing"])))
    server.on("POST", "/v1/adapters/tickets/feedback", Reply(202, {"accepted": 2, "version": 1}))
    server.on("POST", "/v1/tenants", Reply(201, {"id": "tn_1", "name": "acme"}))
    key = {"id": "key_1", "key": "ldk_secret", "scopes": ["predict"], "tenant_id": "tn_1"}
    server.on("POST", "/v1/tenants/tn_1/keys", Reply(201, key))
    server.on("DELETE", "/v1/keys/key_1", Reply(204))
    result = client.adapters.predict("tickets", "refund", version=1)
    assert result.predictions[0].scores == {"billing": 0.9, "other": 0.1}
    assert client.adapters.feedback("tickets", [("a", "billing"), {"text": "b", "label": 2.5}])
    assert client.tenants.create("acme").id == "tn_1"
    assert client.keys.create("tn_1", ["predict"]).key == "ldk_secret"
    client.keys.revoke("key_1")
    sent = {r.path: r.json() for r in server.requests if r.body}
    assert sent["/v1/adapters/tickets/predict"] == {"inputs": ["refund"], "version": 1}
    assert sent["/v1/adapters/tickets/feedback"] == {
        "items": [{"text": "a", "label": "billing"}, {"text": "b", "label": 2.5}]
    }
    assert sent["/v1/tenants/tn_1/keys"] == {"scopes": ["predict"]}
    assert len(server.hits("DELETE", "/v1/keys/key_1")) == 1


def test_download_writes_the_servers_filename_and_import_uploads_it(server, client, tmp_path):
    zipped = b"PK\x03\x04 fake zip"
    disposition = {"Content-Disposition": 'attachment; filename="tickets-v2.zip"'}
    server.on("GET", "/v1/adapters/tickets/download", Reply(200, zipped, disposition))
    server.on("POST", "/v1/adapters/import", Reply(201, samples.adapter()))
    path = client.adapters.download("tickets", 2, tmp_path)
    assert path == tmp_path / "tickets-v2.zip"
    assert path.read_bytes() == zipped
    named = client.adapters.download("tickets", 2, tmp_path / "sub" / "mine.zip")
    assert named.read_bytes() == zipped
    assert server.hits("GET", "/v1/adapters/tickets/download")[0].query == "version=2"
    assert client.adapters.import_(path).name == "tickets"
    form = server.hits("POST", "/v1/adapters/import")[0].form()
    assert form == {"file": ("tickets-v2.zip", zipped, "application/zip")}
    assert not list(tmp_path.rglob("*.partial"))


def test_a_pandas_dataframe_is_sent_as_rows_without_its_missing_values(server, client):
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(
        {
            "text": ["refund my card", "reset password", "parcel late"],
            "label": np.array([0, 1, 2], dtype=np.int64),  # label ids, as numpy integers
            "group": ["eu", None, float("nan")],
        }
    )
    server.on("POST", "/v1/adapters", Reply(202, STARTED))
    client.adapters.create("tickets", training_data=frame, validation_data=frame.head(2),
                           wait=False)  # fmt: skip
    (sent,) = server.hits("POST", "/v1/adapters")
    body = sent.json()
    assert body["training_data"] == [
        {"text": "refund my card", "label": 0, "group": "eu"},
        {"text": "reset password", "label": 1},
        {"text": "parcel late", "label": 2},
    ]
    assert body["validation_data"] == body["training_data"][:2]


def test_a_dataframe_beside_a_file_goes_as_jsonl(server, client, tmp_path):
    import pandas as pd

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    server.on("POST", "/v1/adapters", Reply(202, STARTED))
    client.adapters.create("tickets", training_file=path, validation_data=pd.DataFrame(ROWS),
                           wait=False)  # fmt: skip
    (sent,) = server.hits("POST", "/v1/adapters")
    _, content, _ = sent.form()["validation_file"]
    assert [json.loads(line) for line in content.decode().splitlines()] == ROWS
