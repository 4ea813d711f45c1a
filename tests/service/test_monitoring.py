"""Drift, live accuracy and the monitoring report, in-process on the tiny BERT."""

import random

import pytest
import torch

from loradock.adapters.monitoring.drift import mmd_test, psi
from tests.datasets import keyword_rows
from tests.service.test_app import assert_problem
from tests.service.test_predict_api import predict, trained
from tests.service.test_training_api import wait_job


def test_psi_is_zero_for_equal_and_large_for_shifted_distributions():
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0, abs=1e-9)
    assert psi([50, 50, 0], [50, 50, 0]) == pytest.approx(0.0, abs=1e-9)
    assert psi([80, 10, 10], [10, 10, 80]) > 1.0
    assert 0 < psi([50, 50], [55, 45]) < 0.05


def test_mmd_permutation_test_separates_shifted_samples():
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=g)
    same = torch.randn(100, 8, generator=g)
    shifted = torch.randn(100, 8, generator=g) + 1.0
    assert mmd_test(x, same).p_value > 0.05
    assert mmd_test(x, shifted).p_value < 0.01
    assert mmd_test(x, shifted).statistic > mmd_test(x, same).statistic


@pytest.fixture
def monitored(app_client):
    s = app_client.app.state.runtime.settings
    s.drift_min_count, s.drift_check_every = 60, 60
    trained(app_client, rows_per_class=60)
    return app_client


def send(client, texts, chunk=20):
    for i in range(0, len(texts), chunk):
        assert predict(client, "tickets", texts[i : i + chunk]).status_code == 200


def test_in_distribution_traffic_is_quiet_and_new_traffic_is_flagged(monitored):
    same = [r["text"] for r in keyword_rows(40, seed=11)][:120]
    send(monitored, same)
    report = monitored.get("/v1/adapters/tickets/monitoring").json()
    drift = report["drift"]
    assert drift["status"] == "scored"
    assert drift["signals"]["embedding"]["p_value"] > 0.05
    assert drift["signals"]["predicted_label"]["psi"] < 0.2

    rng = random.Random(3)
    other = [" ".join(rng.choice("abcdefghij") for _ in range(rng.randint(20, 40)))
             for _ in range(120)]  # fmt: skip
    send(monitored, other)
    report = monitored.get("/v1/adapters/tickets/monitoring").json()
    drift = report["drift"]
    assert drift["drifting"] is True
    assert "embedding" in drift["drifted_signals"]
    assert drift["signals"]["embedding"]["p_value"] < 0.05
    assert any("drifted" in f for f in report["flags"])
    metrics = monitored.get("/metrics").text
    assert "loradock_adapters_drifting 1.0" in metrics
    assert f'loradock_adapter_drifting{{adapter="{report["adapter"]}"}} 1.0' in metrics


def test_feedback_gives_live_accuracy(monitored):
    rows = keyword_rows(10, seed=21)
    resp = monitored.post("/v1/adapters/tickets/feedback", json={"items": rows})
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"] == len(rows)
    live = monitored.get("/v1/adapters/tickets/monitoring").json()["live_accuracy"]
    assert live["items"] == len(rows)
    preds = predict(monitored, "tickets", [r["text"] for r in rows]).json()["predictions"]
    expected = sum(p["label"] == r["label"] for p, r in zip(preds, rows, strict=True)) / len(rows)
    assert live["accuracy"] == pytest.approx(expected, abs=1e-4)
    assert live["gap"] == pytest.approx(live["validation_accuracy"] - live["accuracy"], abs=1e-4)


def test_feedback_rejects_unknown_labels(monitored):
    body = {"items": [{"text": "refund", "label": "billing"}, {"text": "x", "label": "nope"}]}
    assert_problem(monitored.post("/v1/adapters/tickets/feedback", json=body), 422, "items[1]")
    nul = {"items": [{"text": "refund\x00", "label": "billing"}]}  # PostgreSQL text has no NUL
    assert_problem(monitored.post("/v1/adapters/tickets/feedback", json=nul), 422, "NUL")


def test_report_explains_training(monitored):
    report = monitored.get("/v1/adapters/tickets/monitoring").json()
    assert report["live_version"] == 1
    assert report["training"]["history"]
    assert report["overfitting"]["stop_reason"] in ("early_stopping", "max_epochs")
    assert report["overfitting"]["winner"] in ("lora", "probe")
    best = report["overfitting"]["best_epoch"]
    restored = [f for f in report["flags"] if f"restored {best}" in f]
    if report["overfitting"]["stop_reason"] == "early_stopping":
        assert len(restored) == 1  # the report says where it stopped and what it kept
        assert report["overfitting"]["epochs_run"] > best
    else:
        assert restored == []  # no early-stopping flag when training ran every epoch
    assert report["drift"]["window_rows"] == 0


def test_per_adapter_quality_gauges(monitored):
    from prometheus_client.parser import text_string_to_metric_families

    adapter = monitored.get("/v1/adapters/tickets").json()
    version = adapter["versions"][0]
    rows = keyword_rows(10, seed=21)
    monitored.post("/v1/adapters/tickets/feedback", json={"items": rows})
    report = monitored.get("/v1/adapters/tickets/monitoring").json()
    got = {
        s.name: s.value
        for f in text_string_to_metric_families(monitored.get("/metrics").text)
        for s in f.samples
        if s.labels.get("adapter") == adapter["id"]
    }
    served = version["baseline"] if version["report"]["winner"] == "probe" else version["metrics"]
    assert got["loradock_adapter_validation_accuracy"] == pytest.approx(
        served["val_accuracy"], abs=1e-3
    )
    assert got["loradock_adapter_validation_macro_f1"] == pytest.approx(
        served["val_macro_f1"], abs=1e-3
    )
    assert got["loradock_adapter_baseline_won"] == (version["report"]["winner"] == "probe")
    live = report["live_accuracy"]
    assert got["loradock_adapter_live_accuracy"] == pytest.approx(live["accuracy"], abs=1e-3)
    assert got["loradock_adapter_live_accuracy_gap"] == pytest.approx(
        served["val_accuracy"] - live["accuracy"], abs=1e-3
    )


def test_psi_noise_floor():
    from loradock.adapters.monitoring.drift import psi_excess, psi_noise

    assert psi_noise(10, 50, 300) == pytest.approx(9 * (1 / 50 + 1 / 300))
    # two samples of one distribution: raw PSI is about the noise, the excess about 0
    rng = random.Random(0)
    a = [0] * 10
    b = [0] * 10
    for _ in range(50):
        a[rng.randrange(10)] += 1
    for _ in range(300):
        b[rng.randrange(10)] += 1
    raw, noise, excess = psi_excess(a, b)
    assert noise == pytest.approx(psi_noise(10, 50, 300))  # all 10 bins occupied
    assert raw > 0.05
    assert excess < raw
    assert excess < 0.2
    raw, _noise, excess = psi_excess([45, 5], [5, 45])
    assert excess > 1.0


def test_drift_windows_are_bounded_across_adapters(app_client):
    runtime = app_client.app.state.runtime
    runtime.settings.drift_max_adapters = 2
    for i, name in enumerate(("a", "b", "c")):
        trained(app_client, name=name, seed=i)
        assert predict(app_client, name, ["refund for my card"]).status_code == 200
    monitor = runtime.monitor
    assert monitor.drain()
    ids = {a["name"]: a["id"] for a in app_client.get("/v1/adapters").json()["adapters"]}
    assert list(monitor._windows) == [(ids["b"], 1), (ids["c"], 1)]  # least recently used gone
    assert monitor.evicted == 1
    window = monitor._windows[(ids["c"], 1)]
    row = window.rows[0]
    assert row.pooled.dtype == torch.float16
    assert row.pooled.untyped_storage().nbytes() == row.pooled.numel() * 2  # its own copy
    assert monitor.report(ids["a"])["status"] == "no traffic yet"


def test_shadow_traffic_to_another_version_never_resets_the_live_window(app_client):
    trained(app_client)
    rows = keyword_rows(20, seed=3)
    resp = app_client.post("/v1/adapters/tickets/versions",
                           json={"training_data": rows, "promote": "never"})  # fmt: skip
    assert resp.status_code == 202, resp.text
    assert wait_job(app_client, resp.json()["job"]["id"])["status"] == "succeeded"
    texts = [r["text"] for r in keyword_rows(10, seed=7)]
    assert predict(app_client, "tickets", texts).status_code == 200  # live: version 1
    assert predict(app_client, "tickets", texts[:5], version=2).status_code == 200  # shadow
    assert predict(app_client, "tickets", texts[:3]).status_code == 200
    drift = app_client.get("/v1/adapters/tickets/monitoring").json()["drift"]
    assert drift["version"] == 1
    assert drift["window_rows"] == len(texts) + 3  # not reset by the version-2 traffic
    assert drift["shadow"]["2"]["window_rows"] == 5
