"""The Grafana dashboard only queries metrics the server really exports."""

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.service.test_predict_api import predict, trained

DASHBOARD = (
    Path(__file__).resolve().parents[1] / "helm" / "loradock" / "dashboards" / "loradock.json"
)
FUNCTIONS = {"sum", "rate", "increase", "histogram_quantile", "max", "topk", "by", "le"}


def test_every_dashboard_query_uses_exported_metrics(app_client):
    runtime = app_client.app.state.runtime
    runtime.settings.drift_min_count = runtime.settings.drift_check_every = 5
    trained(app_client)
    assert predict(app_client, "tickets", ["refund please", "login error"] * 5).status_code == 200
    assert predict(app_client, "missing", ["x"]).status_code == 404
    feedback = {"items": [{"text": "refund", "label": "billing"}]}
    assert app_client.post("/v1/adapters/tickets/feedback", json=feedback).status_code == 202
    runtime.monitor.drain()
    exported = set()
    for family in text_string_to_metric_families(app_client.get("/metrics").text):
        exported.add(family.name)
        exported.update(s.name for s in family.samples)
    # per-job training loss only exists while a job runs; it is declared all the same
    exported.add("loradock_training_job_loss")
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\b(?:loradock|process)_[a-z_]+", target["expr"]))
            assert names, target["expr"]
            unknown = names - exported - FUNCTIONS
            assert not unknown, f"panel {panel['title']!r} queries unknown metrics {unknown}"
