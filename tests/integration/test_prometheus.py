"""A real Prometheus server scrapes a real loradock server; PromQL reads the metrics back.

Needs Debian's `prometheus` package (prometheus + promtool), which .ci/run installs.
"""

import shutil
import subprocess
import time

import httpx
import pytest

from tests.datasets import keyword_rows
from tests.server import ServerProcess, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("promtool") is None,
        reason="Debian package 'prometheus' not installed (.ci/run installs it)",
    ),
]
FAST = {"learning_rate": 0.05, "init_head_l2": 0.001, "batch_size": 8, "epochs": 2}


def query(url, promql):
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def wait_for(fn, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
        except httpx.HTTPError:  # Prometheus still starting
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError


def test_prometheus_scrapes_and_promql_reads_back(tmp_path, tiny_bert_dir):
    with ServerProcess(tmp_path / "d", base_model=tiny_bert_dir) as server, server.client() as c:
        r = c.post("/v1/adapters", json={"name": "tickets", "training_data": keyword_rows(20),
                                          "hyperparameters": FAST})  # fmt: skip
        job = r.json()["job"]["id"]
        wait_for(lambda: c.get(f"/v1/jobs/{job}").json()["status"] == "succeeded")
        for _ in range(5):
            assert c.post("/v1/adapters/tickets/predict", json={"inputs": ["refund"]}).is_success
        assert c.post("/v1/adapters/nope/predict", json={"inputs": ["x"]}).status_code == 404

        text = httpx.get(f"{server.url}/metrics").text
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                              text=True, check=False)  # fmt: skip
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert lint.stdout.strip() == ""  # no naming or unit warnings either

        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: loradock\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
        )
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            up = wait_for(lambda: query(url, 'up{job="loradock"} == 1'))
            assert up[0]["value"][1] == "1"
            served = wait_for(
                lambda: query(url, 'sum(loradock_predict_requests_total{protocol="v1"})')
            )
            assert float(served[0]["value"][1]) == 5
            failed = query(url, "sum by (reason) (loradock_predict_failures_total)")
            assert {r["metric"]["reason"]: float(r["value"][1]) for r in failed} == {"not_found": 1}
            jobs = query(url, 'loradock_training_jobs{state="succeeded"}')
            assert float(jobs[0]["value"][1]) == 1
            p99 = query(url, "histogram_quantile(0.99, sum by (le) "
                             "(loradock_predict_duration_seconds_bucket))")  # fmt: skip
            assert 0 < float(p99[0]["value"][1]) < 30
            resident = query(url, 'loradock_adapters_resident{tier="device"}')
            assert float(resident[0]["value"][1]) == 1
        finally:
            prom.terminate()
            prom.wait(30)
