"""Uploads are parsed and validated in a child process: the same answers as in-process, errors
included, and the server's own process does none of the row work."""

import os

import pytest

from tests.conftest import started_client
from tests.datasets import keyword_rows
from tests.service.test_app import assert_problem
from tests.service.test_training_api import FAST, wait_job


@pytest.fixture
def child_client(settings, metrics):
    with started_client(settings.model_copy(update={"dataset_workers": 1}), metrics) as client:
        yield client


def test_uploads_are_validated_in_a_child_process(child_client):
    runtime = child_client.app.state.runtime
    rows = keyword_rows(20)
    body = {"name": "tickets", "training_data": [*rows, rows[0]], "hyperparameters": FAST}
    resp = child_client.post("/v1/adapters", json=body)
    assert resp.status_code == 202, resp.text
    pool = runtime.datasets._pool
    assert pool is not None  # started on the first upload
    pids = {p.pid for p in pool._processes.values()}
    assert pids
    assert os.getpid() not in pids
    version = resp.json()["adapter"]["versions"][0]
    assert version["report"]["warnings"] == ["training_data: dropped 1 exact duplicate rows"]
    assert wait_job(child_client, resp.json()["job"]["id"])["status"] == "succeeded"

    # A multipart CSV upload of a new version goes the same way.
    csv = "text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in keyword_rows(8, 3))
    resp = child_client.post(
        "/v1/adapters/tickets/versions",
        files={"training_file": ("rows.csv", csv.encode(), "text/csv")},
        data={"hyperparameters": '{"epochs": 1}'},
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["job"]["version"] == 2


def test_a_dead_worker_is_replaced_and_the_upload_still_succeeds(child_client):
    import signal

    rows = keyword_rows(5)
    body = {"name": "first", "training_data": rows, "hyperparameters": FAST}
    assert child_client.post("/v1/adapters", json=body).status_code == 202
    datasets = child_client.app.state.runtime.datasets
    (pid,) = [p.pid for p in datasets._pool._processes.values()]
    os.kill(pid, signal.SIGKILL)  # e.g. the OOM killer
    resp = child_client.post("/v1/adapters", json={**body, "name": "second"})
    assert resp.status_code == 202, resp.text  # parsed in-process this once
    resp = child_client.post("/v1/adapters", json={**body, "name": "third"})
    assert resp.status_code == 202, resp.text
    (new_pid,) = [p.pid for p in datasets._pool._processes.values()]
    assert new_pid != pid  # a fresh worker took over


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"name": "x", "training_data": [{"text": "a", "label": "b"}]}', "at least 4"),
        (b'{"name": "x", "training_data": [], "hyperparameters": {"rank": 999}}', "rank"),
        (b'{"name": "x", "task": "summarize", "training_data": []}', "unknown task"),
    ],
)
def test_errors_from_the_child_are_the_same_problems(child_client, body, detail):
    resp = child_client.post(
        "/v1/adapters", content=body, headers={"Content-Type": "application/json"}
    )
    problem = assert_problem(resp, 422, detail)
    assert problem["type"] == "urn:loradock:problem:validation-error"
    assert child_client.get("/v1/adapters").json()["adapters"] == []  # nothing stored


def test_row_problems_keep_their_locations(child_client):
    rows = [*keyword_rows(3), {"text": "", "label": "billing"}, {"text": "t", "label": None}]
    resp = child_client.post("/v1/adapters", json={"name": "x", "training_data": rows})
    problem = assert_problem(resp, 422, "row 10")
    where = [(e["row"], e["field"]) for e in problem["errors"]]
    assert where == [(10, "text"), (11, "label")]


def test_the_worker_exits_when_the_server_process_is_killed(tmp_path):
    """A server killed with -9 must not leave its dataset worker behind."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from loradock.service.datasets import DatasetWorker, Limits\n"
        "w = DatasetWorker(1)\n"
        "try:\n"
        "    w.prepare(b'{', 'AdapterCreate', None, Limits(10, 10, 8, ('query',)))\n"
        "except Exception:\n"
        "    pass\n"
        "print(*[p.pid for p in w._pool._processes.values()], flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(x) for x in proc.stdout.readline().split()]
        assert children
        for pid in children:
            os.kill(pid, 0)  # alive while the server lives
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        alive = children
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in alive if _running(pid)]
        assert alive == [], "dataset worker outlived its killed server"
    finally:
        proc.kill()


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
