"""The `loradock` command line: output, --json, exit codes, and the one entry point."""

import json
import subprocess
import sys

import pytest
from loradock_client.cli import main
from loradock_client.textplot import line_chart

from tests.clients import samples
from tests.clients.fake_server import FakeServer, Reply, problem

MONITORING = {
    "adapter": "ad_1",
    "name": "tickets",
    "live_version": 1,
    "training": {
        "history": samples.HISTORY,
        "metrics": samples.version()["metrics"],
        "baseline": samples.version()["baseline"],
        "warnings": [],
    },
    "overfitting": {
        "verdict": "ok",
        "generalization_gap": 0.1,
        "winner": "lora",
        "winner_reason": "LoRA beats the probe",
    },
    "drift": {
        "status": "scored",
        "window_rows": 80,
        "drifted_signals": ["predicted_label"],
        "signals": {"predicted_label": {"psi": 0.45}, "embedding": {"mmd2": 0.01, "p_value": 0.2}},
    },
    "live_accuracy": {"items": 30, "accuracy": 0.7, "validation_accuracy": 0.8, "gap": 0.1},
    "flags": ["predictions drifted: 'billing' 12% -> 41% (PSI 0.45)"],
}


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def run(server, capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--url", server.url, "--api-key", "k", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_prints_a_table_or_json(server, capsys, tmp_path):
    server.on(
        "POST", "/v1/adapters/tickets/predict", Reply(200, samples.prediction(["billing", "login"]))
    )
    code, out, _ = run(server, capsys, "predict", "tickets", "refund my card", "reset password")
    assert code == 0
    assert out.splitlines()[0].split() == ["text", "label", "score"]
    assert "refund my card  billing  0.9000" in out
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "refund my card"}\n{"text": "reset password"}\n')
    code, out, _ = run(server, capsys, "predict", "tickets", "--file", str(texts), "--json")
    assert code == 0
    assert json.loads(out)["predictions"][1]["label"] == "login"
    assert server.requests[-1].json()["inputs"] == ["refund my card", "reset password"]


def test_json_is_accepted_before_or_after_the_command(server, capsys):
    server.on("GET", "/v1/adapters", Reply(200, {"adapters": [samples.adapter()]}))
    for argv in (["--json", "adapters", "list"], ["adapters", "list", "--json"]):
        code, out, _ = run(server, capsys, *argv)
        assert code == 0
        assert json.loads(out)[0]["name"] == "tickets"
    code, out, _ = run(server, capsys, "adapters", "list")
    assert "tickets  ad_1  classification  ready" in out


def test_api_errors_exit_1_with_the_problem(server, capsys, tmp_path):
    server.on("GET", "/v1/adapters/nope", Reply(404, problem(404, "adapter 'nope' not found")))
    errors = [{"loc": ["body", "training_data", "3", "label"], "msg": "missing", "type": "x"}]
    server.on("POST", "/v1/adapters", Reply(422, problem(422, "bad rows", errors=errors)))
    code, out, err = run(server, capsys, "adapters", "show", "nope")
    assert (code, out) == (1, "")
    assert err.strip() == "loradock: error: 404 Not found: adapter 'nope' not found"
    code, _, err = run(server, capsys, "--json", "adapters", "show", "nope")
    assert code == 1
    assert json.loads(err)["status"] == 404
    train = tmp_path / "train.csv"
    train.write_text("text,label\nrefund,billing\n")
    code, _, err = run(server, capsys, "adapters", "create", "t", "--file", str(train))
    assert code == 1
    assert err.splitlines() == [
        "loradock: error: 422 Invalid request: bad rows",
        "  body.training_data.3.label: missing",
    ]


def test_missing_key_gets_a_hint(server, capsys, monkeypatch):
    monkeypatch.delenv("LORADOCK_API_KEY", raising=False)
    server.on("GET", "/v1/tenants", Reply(401, problem(401, "missing Authorization header")))
    code = main(["--url", server.url, "tenants", "list"])
    err = capsys.readouterr().err
    assert code == 1
    assert "401 Unauthorized: missing Authorization header" in err
    assert "LORADOCK_API_KEY" in err
    assert "bootstrap-key" in err


def test_usage_errors_exit_2(server, capsys, tmp_path):
    assert run(server, capsys, "predict", "tickets")[0] == 2
    code, _, err = run(server, capsys, "adapters", "create", "t", "--file", str(tmp_path / "no"))
    assert code == 2
    assert "no such file" in err
    with pytest.raises(SystemExit) as exit_:
        main(["adapters", "frobnicate"])
    assert exit_.value.code == 2


def test_create_follows_the_job_and_prints_epochs_and_a_summary(server, capsys, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "refund", "label": "billing"}\n')
    started = {
        "adapter": samples.adapter(live=None, status="training"),
        "job": samples.job("queued"),
    }
    server.on("POST", "/v1/adapters", Reply(202, started))
    server.on("GET", "/v1/jobs/job_1/events", Reply(events=samples.job_events()))
    server.on("GET", "/v1/adapters/ad_1", Reply(200, samples.adapter()))
    code, out, _ = run(
        server,
        capsys,
        "adapters",
        "create",
        "tickets",
        "-f",
        str(train),
        "--hp",
        "epochs=5",
        "--hp",
        'target_modules=["query"]',
    )
    assert code == 0
    assert "epoch 3  train_loss 0.3000  val_loss 0.7000" in out
    assert "epochs run: 3, stop reason: early_stopping, best epoch: 2" in out
    form = server.hits("POST", "/v1/adapters")[0].form()
    assert json.loads(form["hyperparameters"][1]) == {"epochs": 5, "target_modules": ["query"]}
    code, out, _ = run(server, capsys, "--json", "jobs", "watch", "job_1")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert lines[-1]["event"] == "end"
    assert lines[-1]["data"]["status"] == "succeeded"


def test_monitoring_show_draws_the_loss_curves(server, capsys):
    server.on("GET", "/v1/adapters/tickets/monitoring", Reply(200, MONITORING))
    code, out, _ = run(server, capsys, "monitoring", "show", "tickets")
    assert code == 0
    assert "Loss per epoch" in out
    assert "* train_loss   o val_loss" in out
    chart = out[out.index("Loss per epoch") :]
    assert "*" in chart
    assert "o" in chart
    assert "predicted_label  PSI 0.450" in out
    assert "DRIFTED" in out
    assert "Live accuracy: 0.7000 on 30 labelled items" in out
    assert "  - predictions drifted: 'billing' 12% -> 41% (PSI 0.45)" in out


def test_line_chart_places_points_by_value():
    lines = line_chart({"a": [3.0, 2.0, 1.0], "b": [1.0, 1.0, 1.0]}, height=3, width=3)
    assert lines[0].endswith("|*")
    assert lines[1].endswith("| *")
    assert lines[2].endswith("|oo#")  # both series at 1.0 in the last column
    assert lines[-1].strip() == "* a   o b"
    assert line_chart({"a": []}) == ["(nothing to plot)"]


# --- one `loradock` command: the server's script delegates, the client's hands back `serve` ------


def python(*code_and_args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *code_and_args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kw,
    )


def test_the_server_command_delegates_client_commands(server):
    server.on("GET", "/v1/adapters", Reply(200, {"adapters": [samples.adapter()]}))
    r = python("-m", "loradock.service.cli", "adapters", "list", "--json", "--url", server.url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["id"] == "ad_1"
    r = python("-m", "loradock.service.cli")
    assert r.returncode == 2
    assert "serve" in r.stderr
    assert "adapters" in r.stderr


def test_the_client_command_hands_serve_to_the_server():
    r = python("-m", "loradock_client", "serve", "--help")
    assert r.returncode == 0, r.stderr
    assert "--base-model" in r.stdout
    assert "LORADOCK_BASE_MODEL" in r.stdout


def test_each_half_says_what_to_install_when_the_other_is_missing():
    hide_client = "import sys; sys.modules['loradock_client'] = None\n"
    r = python(
        "-c",
        hide_client + "from loradock.service.cli import main\nsys.exit(main(['adapters', 'list']))",
    )
    assert r.returncode == 2
    assert "pip install ./clients/python" in r.stderr
    assert "Traceback" not in r.stderr
    r = python(
        "-c", hide_client + "from loradock.service.cli import main\nsys.exit(main(['--help']))"
    )
    assert r.returncode == 0
    assert "serve" in r.stdout
    assert "./clients/python" in r.stdout
    r = python(
        "-c",
        "import sys; sys.modules['loradock.service.cli'] = None\n"
        "from loradock_client.cli import main; sys.exit(main(['serve']))",
    )
    assert r.returncode == 2
    assert "needs the loradock server" in r.stderr
    assert "Traceback" not in r.stderr


def test_long_waits_are_announced_and_folds_are_separated(server, capsys):
    server.on(
        "POST",
        "/v1/adapters/tickets/predict",
        Reply(429, problem(429, "queue full"), {"Retry-After": "1"}),
        Reply(200, samples.prediction(["billing"])),
    )
    code, _, err = run(server, capsys, "predict", "tickets", "refund")
    assert code == 0
    assert "loradock: 429 Too Many Requests; retrying in 1s" in err
    epoch = [("epoch", {"epoch": n, "train_loss": 0.5}) for n in (1, 2)]
    events = [("status", {"status": "running"}), ("progress", {"folds": 2, "fold": 1})]
    events += epoch * 3 + [("end", samples.job())]
    server.on("GET", "/v1/jobs/job_1/events", Reply(events=events))
    server.on("GET", "/v1/adapters/ad_1", Reply(200, samples.adapter()))
    code, out, _ = run(server, capsys, "jobs", "watch", "job_1")
    assert code == 0
    lines = out.splitlines()
    assert lines[:8] == [
        "job job_1: running",
        "epoch 1  train_loss 0.5000",
        "epoch 2  train_loss 0.5000",
        "-- cross-validation fold 2/2 --",
        "epoch 1  train_loss 0.5000",
        "epoch 2  train_loss 0.5000",
        "-- final fit on every row --",
        "epoch 1  train_loss 0.5000",
    ]


def test_epochs_tagged_by_the_server_are_labelled_by_their_fold(server, capsys):
    # A server that tags epochs: labels come from the tags, even when the epoch count does not
    # restart (here fold 2 continues at epoch 3), and the final fit is named as such.
    events = [("status", {"status": "running"}), ("progress", {"folds": 2, "fold": 1})]
    events += [("epoch", {"epoch": 1, "train_loss": 0.5, "fold": 1})]
    events += [("epoch", {"epoch": 3, "train_loss": 0.5, "fold": 2})]
    events += [("epoch", {"epoch": 4, "train_loss": 0.5, "final_fit": True})]
    events += [("end", samples.job())]
    server.on("GET", "/v1/jobs/job_1/events", Reply(events=events))
    server.on("GET", "/v1/adapters/ad_1", Reply(200, samples.adapter()))
    code, out, _ = run(server, capsys, "jobs", "watch", "job_1")
    assert code == 0
    assert out.splitlines()[:7] == [
        "job job_1: running",
        "-- cross-validation fold 1/2 --",
        "epoch 1  train_loss 0.5000",
        "-- cross-validation fold 2/2 --",
        "epoch 3  train_loss 0.5000",
        "-- final fit on every row --",
        "epoch 4  train_loss 0.5000",
    ]


def summary(name: str, ident: str) -> dict:
    return {
        "id": ident, "name": name, "task": "classification", "labels": ["a", "b"],
        "live_version": 2, "status": "ready", "created_at": samples.T0, "version_count": 2,
        "latest_version": 2, "live_metrics": {"val_macro_f1": 0.8125},
    }  # fmt: skip


def test_lists_page_through_every_cursor(server, capsys):
    server.on(
        "GET",
        "/v1/adapters",
        Reply(200, {"adapters": [summary("one", "ad_1"), summary("two", "ad_2")],
                    "next_cursor": "c1"}),
        Reply(200, {"adapters": [summary("three", "ad_3")], "next_cursor": None}),
    )  # fmt: skip
    code, out, _ = run(server, capsys, "adapters", "list")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["one", "two", "three"]
    assert "three  ad_3  classification  ready   2     2         0.8125" in out
    first, second = server.hits("GET", "/v1/adapters")
    assert "view=summary" in first.query
    assert "cursor" not in first.query
    assert "cursor=c1" in second.query
    server.on("GET", "/v1/jobs", Reply(200, {"jobs": [samples.job()], "next_cursor": "j1"}),
              Reply(200, {"jobs": [], "next_cursor": None}))  # fmt: skip
    code, out, _ = run(server, capsys, "jobs", "list", "--full", "--json")
    assert code == 0
    assert [j["id"] for j in json.loads(out)] == ["job_1"]
    first, second = server.hits("GET", "/v1/jobs")
    assert "view=full" in first.query
    assert "cursor=j1" in second.query
