"""Predicting more texts than one request takes: split, bounded concurrency, order, one version,
retries, and `loradock predict --file --output` (against a real local HTTP server)."""

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
from loradock_client import AsyncClient, Client, RetryPolicy, ValidationFailed

from tests.clients.fake_server import FakeServer, Recorded, Reply, problem

PREDICT = "/v1/adapters/tickets/predict"
FAST = RetryPolicy(max_attempts=4, backoff=0.05, max_backoff=0.2)


def echo(version: int = 7, limit: int = 256, in_flight: list | None = None):
    """A predict route that labels each text with itself, and answers with the version asked
    for (or `version`): what came back, and in which order, is exact."""
    lock = threading.Lock()
    now = [0]

    def compute(req: Recorded) -> dict:
        body = req.json()
        if len(body["inputs"]) > limit:
            return 422, problem(422, f"at most {limit} inputs")
        if in_flight is not None:
            with lock:
                now[0] += 1
                in_flight.append(now[0])
        served = body.get("version") or version
        out = {
            "adapter": "ad_1",
            "version": served,
            "predictions": [{"label": t, "score": 1.0, "scores": {t: 1.0}} for t in body["inputs"]],
        }
        if in_flight is not None:
            time.sleep(0.05)  # answering takes a while: requests in flight overlap
            with lock:
                now[0] -= 1
        return out

    return compute


def texts(n: int) -> list[str]:
    return [f"text {i}" for i in range(n)]


def test_a_big_input_is_split_into_requests_and_answered_in_order():
    with FakeServer() as server:
        server.on("POST", PREDICT, Reply(compute=echo(), delay=0.01))
        progress = []
        with Client(server.url, "k", retry=FAST) as client:
            result = client.predict(
                "tickets", texts(1000), batch_size=64, concurrency=4, on_progress=progress.append
            )
        assert result.labels == texts(1000)
        assert result.version == 7
        hits = server.hits("POST", PREDICT)
        # 16 requests (in flight together, they arrive in any order)
        assert sorted(len(h.json()["inputs"]) for h in hits) == [40] + [64] * 15
        # The first answer pins the version: every later request asks for version 7.
        assert hits[0].json()["version"] is None
        assert {h.json()["version"] for h in hits[1:]} == {7}
        assert [p.done for p in progress][-1] == 1000
        assert all(p.total == 1000 for p in progress)
        assert sorted(p.done for p in progress) == [p.done for p in progress]


def test_concurrency_is_bounded():
    in_flight: list[int] = []
    with FakeServer() as server:
        server.on("POST", PREDICT, Reply(compute=echo(in_flight=in_flight)))
        with Client(server.url, "k", retry=FAST) as client:
            client.predict("tickets", texts(400), batch_size=20, concurrency=3)
    assert max(in_flight) <= 3
    assert max(in_flight) >= 2  # requests did overlap


def test_small_inputs_are_one_request_as_before():
    with FakeServer() as server:
        server.on("POST", PREDICT, Reply(compute=echo()))
        with Client(server.url, "k", retry=FAST) as client:
            assert client.predict("tickets", "one").labels == ["one"]
            assert client.predict("tickets", texts(64), batch_size=64).labels == texts(64)
        assert len(server.hits("POST", PREDICT)) == 2


def test_a_dropped_predict_is_retried_and_a_refused_batch_stops_with_the_error():
    with FakeServer() as server:
        server.on("POST", PREDICT, Reply(drop=True), Reply(compute=echo()))
        with Client(server.url, "k", retry=FAST) as client:
            # Predictions change nothing on the server: a broken connection is retried.
            assert client.predict("tickets", texts(3)).labels == texts(3)
        server.on("POST", PREDICT, Reply(compute=echo(limit=10)))
        with Client(server.url, "k", retry=FAST) as client, pytest.raises(ValidationFailed):
            client.predict("tickets", texts(50), batch_size=20)


def test_predict_iter_streams_a_lazy_iterable():
    with FakeServer() as server:
        server.on("POST", PREDICT, Reply(compute=echo()))
        with Client(server.url, "k", retry=FAST) as client:
            lazy = (f"text {i}" for i in range(130))
            got = list(client.adapters.predict_iter("tickets", lazy, batch_size=50))
    assert [t for t, _, _ in got] == texts(130)
    assert [p.label for _, p, _ in got] == texts(130)
    assert {v for _, _, v in got} == {7}


def test_the_async_client_splits_the_same_way():
    async def run():
        async with AsyncClient(server.url, "k", retry=FAST) as client:
            return await client.predict("tickets", texts(300), batch_size=64, concurrency=2)

    with FakeServer() as server:
        server.on("POST", PREDICT, Reply(compute=echo(version=3)))
        result = asyncio.run(run())
        hits = server.hits("POST", PREDICT)
    assert result.labels == texts(300)
    assert result.version == 3
    assert len(hits) == 5
    assert {h.json()["version"] for h in hits[1:]} == {3}


def cli(server: FakeServer, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loradock_client", "--url", server.url, "--api-key", "k", *args],
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_cli_predicts_a_file_into_jsonl_with_progress(tmp_path):
    source = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "text": f"text {i}"}) for i in range(500)]
    source.write_text("\n".join(lines) + "\n")
    target = tmp_path / "out.jsonl"
    with FakeServer() as server:
        server.on("POST", PREDICT, Reply(compute=echo()))
        r = cli(server, "predict", "tickets", "--file", str(source), "--output", str(target),
                "--batch-size", "100")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row["id"] for row in rows] == list(range(500))  # input fields kept, in order
    assert all(row["prediction"]["label"] == row["text"] for row in rows)
    assert {row["version"] for row in rows} == {7}
    assert "predicted 500/500 texts" in r.stderr
    assert "wrote 500 predictions" in r.stdout
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_cli_failure_leaves_no_finished_looking_file(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("".join(f"line {i}\n" for i in range(300)))
    target = tmp_path / "out.jsonl"
    with FakeServer() as server:
        server.on("POST", PREDICT, Reply(compute=echo(limit=100)))
        r = cli(server, "predict", "tickets", "-f", str(source), "-o", str(target),
                "--batch-size", "150", "-q")  # fmt: skip
    assert r.returncode == 1
    assert "at most 100 inputs" in r.stderr
    assert "stopped after 0 of 300 rows" in r.stderr
    assert not target.exists()
