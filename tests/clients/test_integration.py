"""The client and the `loradock` CLI against a real server with the default base model."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import openai
import pytest
from loradock_client import (
    AuthenticationError,
    Client,
    JobEvent,
    NotFound,
    PermissionDenied,
    ValidationFailed,
)

from tests.datasets import keyword_rows
from tests.server import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LABELS = {"billing", "login", "shipping"}
# Small and quick on 2 CPU cores: given validation rows (no cross-validation), the top block only.
# A high learning rate for a short test; plain LoRA (B at the same rate), so that the adapted
# embeddings stay near the base's (checked below).
HP = {"epochs": 3, "learning_rate": 0.01, "b_learning_rate_ratio": 1, "trainable_layers": 1,
      "batch_size": 16}  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_client_and_cli_drive_a_real_server(tmp_path):
    train, val = keyword_rows(10), keyword_rows(3, seed=5)
    with ServerProcess(tmp_path / "data") as server, Client(server.url, server.admin_key) as c:
        env = {**os.environ, "LORADOCK_URL": server.url, "LORADOCK_API_KEY": server.admin_key}

        def cli(*args: str, module: str = "loradock_client") -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", module, *args],
                env=env,
                text=True,
                capture_output=True,
                timeout=120,
                check=False,
            )

        # create and wait: the events stream in, the summary compares with the probe
        events: list[JobEvent] = []
        trained = c.adapters.create(
            "tickets",
            training_data=train,
            validation_data=val,
            hyperparameters=HP,
            on_event=events.append,
        )
        assert trained.job.status == "succeeded"
        assert trained.adapter.live_version == 1
        assert set(trained.adapter.labels) == LABELS
        version = trained.version
        assert version is not None
        assert version.baseline.kind == "linear_probe"
        assert version.metrics.stop_reason in ("early_stopping", "max_epochs")
        epochs = [e for e in events if e.event == "epoch"]
        assert len(epochs) == version.metrics.epochs_run == len(version.history)
        assert events[-1].event == "end"
        summary = str(trained)
        assert f"epochs run: {version.metrics.epochs_run}" in summary
        assert "linear probe" in summary

        # retrain through the server's `loradock` (delegated), watch it through the client's
        train_file = write_jsonl(tmp_path / "t.jsonl", train)
        r = cli(
            "adapters",
            "retrain",
            "tickets",
            "--file",
            train_file,
            "--validation-file",
            write_jsonl(tmp_path / "v.jsonl", val),
            "--hp",
            "epochs=2",
            "--hp",
            "trainable_layers=1",
            "--promote",
            "never",
            "--no-wait",
            "--json",
            module="loradock.service.cli",
        )
        assert r.returncode == 0, r.stderr
        job_id = json.loads(r.stdout)["job"]["id"]
        r = cli("jobs", "watch", job_id)
        assert r.returncode == 0, r.stderr
        assert "epoch 1  train_loss" in r.stdout
        assert "linear probe" in r.stdout
        assert c.jobs.watch(job_id, progress=False).status == "succeeded"  # ended: at once
        assert next(j.id for j in c.jobs.list(adapter="tickets")) == job_id

        # predict: labels from the label set, served by the live version
        result = c.predict("tickets", ["refund my card payment", "password login error"])
        assert result.version == 1
        assert set(result.labels) <= LABELS
        assert all(0 <= p.score <= 1 for p in result.predictions)
        r = cli("predict", "tickets", "late package delivery", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["predictions"][0]["label"] in LABELS

        # more texts than one request takes (the server's limit is 256): split, in order
        many = [f"{'refund my card' if i % 2 else 'password login error'} {i}" for i in range(300)]
        batch = c.predict("tickets", many, batch_size=64)
        assert batch.version == 1
        assert len(batch.predictions) == 300
        assert c.predict("tickets", many[:4]).labels == batch.labels[:4]
        rows = [{"id": i, "text": t} for i, t in enumerate(many)]
        source = write_jsonl(tmp_path / "many.jsonl", rows)
        out = tmp_path / "scored.jsonl"
        r = cli("predict", "tickets", "-f", source, "-o", str(out))
        assert r.returncode == 0, r.stderr
        scored = [json.loads(line) for line in out.read_text().splitlines()]
        assert [s["id"] for s in scored] == list(range(300))
        assert [s["prediction"]["label"] for s in scored] == batch.labels
        # the same file as one server-side batch job: same predictions, in the same order
        served = tmp_path / "served.jsonl"
        r = cli("predict", "tickets", "-f", source, "-o", str(served), "--server-side")
        assert r.returncode == 0, r.stderr
        assert "predicted 300/300" in r.stderr
        on_server = [json.loads(line) for line in served.read_text().splitlines()]
        assert [s["id"] for s in on_server] == list(range(300))
        assert [s["prediction"]["label"] for s in on_server] == batch.labels
        submitted = c.adapters.batch("tickets", ["refund my card", ""])
        assert submitted.rows_failed == 1
        lines = c.jobs.wait_results(submitted.job.id)
        assert lines[0]["prediction"]["label"] in LABELS
        assert lines[1]["error"] == "empty text"
        assert c.jobs.get(submitted.job.id).kind == "predict"

        # exports: the real sentence-transformers loads one and reproduces the scores
        from sentence_transformers import SentenceTransformer

        zipped = c.adapters.export("tickets", path=tmp_path, format="sentence-transformers")
        shutil.unpack_archive(zipped, tmp_path / "exported")
        (folder,) = (tmp_path / "exported").iterdir()
        st = SentenceTransformer(str(folder), device="cpu")
        logits = st.encode(many[:4], convert_to_tensor=True)
        got = [dict(zip(sorted(LABELS), row.softmax(-1).tolist(), strict=True)) for row in logits]
        want = [p.scores for p in batch.predictions[:4]]
        for g, w in zip(got, want, strict=True):
            assert max(g, key=g.get) == max(w, key=w.get)
            assert g == pytest.approx(w, abs=0.03)  # the server computes in bf16 where it can
        card = (folder / "README.md").read_text()
        assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card

        # embeddings through the real `openai` client (it asks for base64 by default)
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.admin_key, max_retries=0)
        texts = ["refund my card payment", "password login error"]
        from_base = oai.embeddings.create(model="base", input=texts)
        assert [d.index for d in from_base.data] == [0, 1]
        assert from_base.usage.prompt_tokens > 0
        vectors = np.array([d.embedding for d in from_base.data])
        assert vectors.shape == (2, 384)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
        floats = oai.embeddings.create(model="tickets", input=texts, encoding_format="float")
        assert floats.model == "tickets"
        adapted = np.array([d.embedding for d in floats.data])
        assert np.allclose(np.linalg.norm(adapted, axis=1), 1.0, atol=1e-3)
        assert ((adapted * vectors).sum(axis=1) > 0.8).all()  # LoRA stays near its base
        with pytest.raises(openai.NotFoundError):
            oai.embeddings.create(model="no-such-adapter", input=texts)

        # promote (CLI) and roll back (client): live_version follows, predict follows it
        r = cli("versions", "promote", "tickets", "2", "--json")
        assert r.returncode == 0
        assert json.loads(r.stdout)["live_version"] == 2
        assert c.adapters.get("tickets").live_version == 2
        assert c.predict("tickets", "refund").version == 2
        assert c.versions.promote("tickets", 1).live_version == 1
        assert c.versions.get("tickets", 2).live is False

        # feedback and monitoring
        fb = c.adapters.feedback("tickets", [("refund my card", "billing"), ("my login", "login")])
        assert fb.accepted == 2
        assert fb.version == 1
        r = cli("feedback", "tickets", "--item", "where is my package", "shipping", "--json")
        assert r.returncode == 0
        assert json.loads(r.stdout)["accepted"] == 1
        with pytest.raises(ValidationFailed, match="not a label"):
            c.adapters.feedback("tickets", [("refund", "no-such-label")])
        report = c.adapters.monitoring("tickets")
        assert report.live_version == 1
        assert report.live_accuracy["items"] == 3
        assert len(report.training["history"]) == version.metrics.epochs_run
        r = cli("monitoring", "show", "tickets")
        assert r.returncode == 0, r.stderr
        assert "Loss per epoch" in r.stdout
        assert "* train_loss   o val_loss" in r.stdout
        assert "Live accuracy" in r.stdout

        # tenancy and errors: typed exceptions, --json problems
        tenant = c.tenants.create("acme")
        key = c.keys.create(tenant.id, ["predict"])
        with Client(server.url, key.key) as other:
            assert other.adapters.list() == []
            with pytest.raises(NotFound):
                other.adapters.get("tickets")  # another tenant's adapter does not exist
            with pytest.raises(PermissionDenied):
                other.adapters.delete("tickets")
            c.keys.revoke(key.id)
            with pytest.raises(AuthenticationError):
                other.adapters.list()
        with pytest.raises(NotFound) as missing:
            c.adapters.get("nope")
        assert missing.value.status == 404
        assert missing.value.instance == "/v1/adapters/nope"
        r = cli("--json", "adapters", "show", "nope")
        assert r.returncode == 1
        assert json.loads(r.stderr)["status"] == 404
        r = cli("tenants", "list", "--json", "--api-key", "wrong")
        assert r.returncode == 1
        assert json.loads(r.stderr)["status"] == 401

        # download, delete, import the download back
        zip_path = c.adapters.download("tickets", 1, tmp_path)
        assert zip_path.name == "tickets-v1.zip"
        assert zip_path.stat().st_size > 0
        r = cli("adapters", "delete", "tickets")
        assert r.returncode == 0, r.stderr
        with pytest.raises(NotFound):
            c.adapters.get("tickets")
        imported = c.adapters.import_(zip_path)
        assert set(imported.labels) == LABELS
        assert set(c.predict(imported.id, ["refund my card"]).labels) <= LABELS
        c.adapters.delete(imported.id)
