"""kill -9 at chosen points (mid artifact write, before publish, around a promote): after a restart
every adapter that was servable serves the same version with the same outputs, the interrupted job
is re-queued and finishes, and no half-written version is ever visible."""

import shutil
import time

import httpx
import pytest

from tests.datasets import keyword_rows
from tests.integration.test_jobs_restart import wait_for
from tests.server import ServerProcess

pytestmark = pytest.mark.integration

FAST = {"learning_rate": 0.05, "init_head_l2": 0.001, "batch_size": 8, "epochs": 3}
TEXTS = ["refund for my card charge", "login password error", "late package tracking", "hello"]


def train(c, name, seed, **extra):
    """Train `name` (version 1, or the next version when it exists) and wait for the job."""
    body = {"training_data": keyword_rows(20, seed=seed), "hyperparameters": FAST, **extra}
    if c.get(f"/v1/adapters/{name}").status_code == 200:
        resp = c.post(f"/v1/adapters/{name}/versions", json=body)
    else:
        resp = c.post("/v1/adapters", json={"name": name, **body})
    assert resp.status_code == 202, resp.text
    job = wait_for(c, resp.json()["job"]["id"], lambda j: j["status"] not in ("queued", "running"))
    assert job["status"] == "succeeded", job
    return resp.json()


def scores(c, name, version=None):
    resp = c.post(f"/v1/adapters/{name}/predict", json={"inputs": TEXTS, "version": version})
    assert resp.status_code == 200, resp.text
    return resp.json()["version"], [p["scores"] for p in resp.json()["predictions"]]


def same(a, b):
    return all(
        x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-5 for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_bert_dir):
    """A data dir with `stable` (v1 live) and `moving` (v1 live, v2 ready but not live)."""
    data = tmp_path_factory.mktemp("crash") / "data"
    with ServerProcess(data, base_model=tiny_bert_dir) as server, server.client() as c:
        train(c, "stable", seed=1)
        train(c, "moving", seed=2)
        train(c, "moving", seed=3, promote="never")
        expected = {
            "stable": scores(c, "stable"),
            "moving": scores(c, "moving"),
            "moving v2": scores(c, "moving", version=2),
        }
    assert expected["moving"][0] == 1
    assert not same(expected["moving"][1], expected["moving v2"][1])
    return data, expected


def copy_of(prepared, tmp_path):
    data, expected = prepared
    target = tmp_path / "data"
    shutil.copytree(data, target)
    return target, expected


def died(server, timeout=120):
    """Wait for the crash point to fire: the process must end by SIGKILL (-9)."""
    assert server.proc is not None
    assert server.proc.wait(timeout) == -9, server.log()


def visible_versions(data):
    """Published version directories (what a reader can see), by adapter directory."""
    root = data / "artifacts"
    return sorted(
        str(p.parent.relative_to(root))
        for p in root.glob("*/*/v*/manifest.json")
        if not p.parts[-4].startswith(".")
    )


def staging(data):
    return [p for p in (data / "artifacts" / ".staging").iterdir()]


def assert_servable_as_before(c, expected):
    assert scores(c, "stable")[0] == expected["stable"][0]
    assert same(scores(c, "stable")[1], expected["stable"][1])


@pytest.mark.parametrize("point", ["write:head.safetensors", "rename"])
def test_killed_while_publishing_a_version(prepared, tmp_path, tiny_bert_dir, point):
    data, expected = copy_of(prepared, tmp_path)
    before = visible_versions(data)
    server = ServerProcess(data, base_model=tiny_bert_dir, crashpoint=point).start()
    with server.client() as c:
        body = {"name": "fresh", "training_data": keyword_rows(20, seed=4), "hyperparameters": FAST}
        resp = c.post("/v1/adapters", json=body)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job"]["id"]
    died(server)
    # on disk: the interrupted version sits in staging only, never under its published key
    assert visible_versions(data) == before
    leftovers = staging(data)
    assert len(leftovers) == 1
    names = {p.name for p in leftovers[0].iterdir()}
    assert "head.safetensors" in names
    assert ("manifest.json" in names) == (point == "rename")

    with ServerProcess(data, base_model=tiny_bert_dir) as again, again.client() as c:
        assert staging(data) == []  # swept on start
        assert_servable_as_before(c, expected)
        assert scores(c, "moving") == expected["moving"]
        job = wait_for(c, job_id, lambda j: j["status"] not in ("queued", "running"), timeout=120)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2  # re-queued after the crash, then ran to the end
        assert c.get("/v1/adapters/fresh").json()["live_version"] == 1
        assert scores(c, "fresh")[0] == 1


@pytest.mark.parametrize("when", ["before-commit", "after-commit"])
def test_killed_during_a_promote(prepared, tmp_path, tiny_bert_dir, when):
    data, expected = copy_of(prepared, tmp_path)
    before = visible_versions(data)
    server = ServerProcess(data, base_model=tiny_bert_dir, crashpoint=f"promote:{when}").start()
    with server.client() as c, pytest.raises(httpx.TransportError):
        c.post("/v1/adapters/moving/versions/2/promote")  # the server dies: no answer
    died(server)
    assert visible_versions(data) == before

    with ServerProcess(data, base_model=tiny_bert_dir) as again, again.client() as c:
        assert_servable_as_before(c, expected)
        live = c.get("/v1/adapters/moving").json()["live_version"]
        # all or nothing: the uncommitted promote never happened, the committed one holds
        want = 1 if when == "before-commit" else 2
        assert live == want
        version, got = scores(c, "moving")
        assert version == want
        assert same(got, expected["moving" if want == 1 else "moving v2"][1])
        # and promoting (again) works normally
        assert c.post("/v1/adapters/moving/versions/2/promote").status_code == 200
        deadline = time.monotonic() + 10
        while scores(c, "moving")[0] != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert scores(c, "moving")[0] == 2
