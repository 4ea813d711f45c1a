"""One rule for "the metrics of what is served": the REST report, live accuracy and the
Prometheus gauges agree, for an adapter whose probe won and for one whose LoRA won."""

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.datasets import keyword_rows
from tests.service.test_import_api import download, rezip, unzip, upload
from tests.service.test_predict_api import trained
from tests.service.test_training_api import FAST

GAUGES = {
    "val_loss": "loradock_adapter_validation_loss",
    "val_accuracy": "loradock_adapter_validation_accuracy",
    "val_macro_f1": "loradock_adapter_validation_macro_f1",
}


def gauges(client, adapter_id):
    return {
        s.name: s.value
        for f in text_string_to_metric_families(client.get("/metrics").text)
        for s in f.samples
        if s.labels.get("adapter") == adapter_id
    }


def check_served(client, name, model, expected):
    adapter = client.get(f"/v1/adapters/{name}").json()
    feedback = {"items": keyword_rows(4, seed=5)}
    assert client.post(f"/v1/adapters/{name}/feedback", json=feedback).status_code == 202
    report = client.get(f"/v1/adapters/{name}/monitoring").json()
    served = report["training"]["served"]
    assert served["model"] == model
    for key in GAUGES:
        assert served[key] == pytest.approx(expected[key], abs=1e-9), key
    got = gauges(client, adapter["id"])
    for key, gauge in GAUGES.items():
        assert got[gauge] == pytest.approx(served[key], abs=1e-6), gauge
    assert got["loradock_adapter_baseline_won"] == (model == "probe")
    live = report["live_accuracy"]
    assert live["validation_accuracy"] == served["val_accuracy"]
    assert got["loradock_adapter_live_accuracy_gap"] == pytest.approx(
        served["val_accuracy"] - live["accuracy"],
        abs=1e-4,  # the report rounds to 4 places
    )


def test_probe_won_adapter_reports_the_probes_metrics_everywhere(app_client):
    # No epoch can improve by 1e9: LoRA keeps its start (best epoch 0) and the probe is served.
    hp = {**FAST, "min_delta": 1e9, "init_head_l2": 1.0}  # a start unlike the probe
    trained(app_client, name="probe-won", hyperparameters=hp)
    version = app_client.get("/v1/adapters/probe-won").json()["versions"][0]
    assert version["report"]["winner"] == "probe"
    baseline = version["baseline"]
    assert {k: baseline[k] for k in GAUGES} != {k: version["metrics"].get(k) for k in GAUGES}
    check_served(app_client, "probe-won", "probe", baseline)


def test_lora_won_adapter_reports_loras_metrics_everywhere(app_client):
    # A tiny random encoder rarely lets LoRA beat the probe, so the LoRA-won version is the same
    # trained adapter's artifact with its recorded outcome set to a LoRA win (import keeps it).
    trained(app_client, name="src")
    files = unzip(download(app_client, "src"))
    meta = json.loads(files["loradock.json"])
    lora = {"val_loss": 0.25, "val_accuracy": 0.875, "val_macro_f1": 0.8571}
    probe = {"val_loss": 0.5, "val_accuracy": 0.75, "val_macro_f1": 0.7}
    meta.update(winner="lora", metrics={**meta["metrics"], **lora}, baseline=probe)
    files["loradock.json"] = json.dumps(meta).encode()
    assert upload(app_client, rezip(files), name="lora-won").status_code == 201
    check_served(app_client, "lora-won", "lora", lora)
