"""One request followed through the JSON logs and the OpenTelemetry traces of a real server.

The server runs as a subprocess with LORADOCK_LOG_FORMAT=json, debug level and
LORADOCK_TRACING=otlp; its spans go over OTLP/HTTP (the real SDK exporter, protobuf) to a
receiver in this test, which decodes them with opentelemetry-proto.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.datasets import keyword_rows
from tests.server import ServerProcess

pytestmark = pytest.mark.integration
FAST = {"learning_rate": 0.05, "init_head_l2": 0.001, "batch_size": 8, "epochs": 2}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace endpoint: every span it receives, as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def find(self, predicate: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if predicate(s)]


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for rs in request.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {}
                    for a in s.attributes:
                        v = a.value
                        attrs[a.key] = v.string_value or v.int_value
                    spans.append({
                        "name": s.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(),
                        "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        "attributes": attrs,
                        "service": service.get("service.name"),
                    })  # fmt: skip
        with self.server.lock:
            self.server.spans.extend(spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def wait_for(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_one_request_through_logs_and_traces(tmp_path, tiny_bert_dir):
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.server_port}/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "loradock-test",
    }
    server = ServerProcess(tmp_path / "d", env=env, base_model=tiny_bert_dir, log_level="debug",
                           log_format="json", tracing="otlp")  # fmt: skip
    try:
        with server, server.client() as c:
            r = c.post("/v1/adapters", json={"name": "logs", "training_data": keyword_rows(20),
                                             "hyperparameters": FAST})  # fmt: skip
            assert r.status_code == 202, r.text
            made = r.headers["X-Request-ID"]
            assert len(made) == 32
            assert int(made, 16) >= 0
            job = r.json()["job"]["id"]
            wait_for(lambda: c.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", 120)

            headers = {"X-Request-ID": "req-follow-me.1",
                       "traceparent": f"00-{TRACE_ID}-{PARENT_SPAN}-01"}  # fmt: skip
            r = c.post("/v1/adapters/logs/predict", json={"inputs": ["refund late"]},
                       headers=headers)  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.headers["X-Request-ID"] == "req-follow-me.1"
            # An error carries the id in the header and in the problem+json body.
            bad = c.post("/v1/adapters/nope/predict", json={"inputs": ["x"]},
                         headers={"X-Request-ID": "req-missing"})  # fmt: skip
            assert bad.status_code == 404
            assert bad.headers["X-Request-ID"] == "req-missing"
            assert bad.json()["request_id"] == "req-missing"
            # An id that is not a sane token is replaced, not echoed.
            odd = c.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 200})
            assert odd.headers["X-Request-ID"] != "a b\tc" + "x" * 200
            assert len(odd.headers["X-Request-ID"]) == 32

            # --- traces: the request continues the caller's trace; the batch links to it ----
            request = wait_for(
                lambda: receiver.find(
                    lambda s: s["attributes"].get("loradock.request_id") == "req-follow-me.1"
                )
            )
            (request,) = request
            assert request["name"] == "POST /v1/adapters/{adapter}/predict"
            assert request["trace_id"] == TRACE_ID
            assert request["parent"] == PARENT_SPAN
            assert request["attributes"]["http.response.status_code"] == 200
            assert request["service"] == "loradock-test"
            # The batch that served it links to the request's trace (to the endpoint's span,
            # the current one when the request joined the queue).
            batches = wait_for(
                lambda: receiver.find(
                    lambda s: (
                        s["name"] == "loradock.batch" and any(t == TRACE_ID for t, _ in s["links"])
                    )
                )
            )
            (batch,) = batches
            forward = wait_for(
                lambda: receiver.find(
                    lambda s: s["name"] == "loradock.forward" and s["parent"] == batch["span_id"]
                )
            )
            assert forward[0]["trace_id"] == batch["trace_id"]
            steps = receiver.find(lambda s: s["name"] == "loradock.train_step")
            assert len(steps) >= 2
            assert {s["attributes"]["loradock.epoch"] for s in steps} == {1, 2}
    finally:
        receiver.shutdown()

    # --- logs: every line is one JSON object, uvicorn's included --------------------------------
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(rec) for rec in lines)
    assert any(rec["logger"].startswith("uvicorn") for rec in lines)
    mine = [rec for rec in lines if rec.get("request_id") == "req-follow-me.1"]
    (access,) = [rec for rec in mine if rec["logger"] == "loradock.access"]
    assert access["path"] == "/v1/adapters/logs/predict"
    assert access["status"] == 200
    assert access["method"] == "POST"
    assert access["tenant_id"]
    assert access["duration_ms"] > 0
    (batch_line,) = [rec for rec in lines if "req-follow-me.1" in rec.get("request_ids", [])]
    assert batch_line["logger"] == "loradock.service.batcher"
    assert batch_line["rows"] >= 1
    missing = [rec for rec in lines if rec.get("request_id") == "req-missing"]
    assert [rec["status"] for rec in missing if rec["logger"] == "loradock.access"] == [404]
    assert any(rec.get("request_id") == made and rec["status"] == 202 for rec in lines
               if rec["logger"] == "loradock.access")  # fmt: skip


def test_plain_logs_name_the_request(tmp_path, tiny_bert_dir):
    server = ServerProcess(tmp_path / "d", base_model=tiny_bert_dir, log_format="plain")
    with server, server.client() as c:
        r = c.get("/v1/adapters", headers={"X-Request-ID": "plain-1"})
        assert r.status_code == 200
        assert r.headers["X-Request-ID"] == "plain-1"
    log = server.log_path.read_text()
    # Every line written during the request names it; one of them is its access line.
    (line,) = [ln for ln in log.splitlines() if "[plain-1]" in ln and "loradock.access" in ln]
    assert "INFO loradock.access [plain-1]: " in line
    assert '"GET /v1/adapters HTTP/1.1" 200' in line
    assert not any(ln.lstrip().startswith("{") for ln in log.splitlines())
