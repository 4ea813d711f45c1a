"""The chart's alert rules, checked and unit-tested by Prometheus's own promtool: each alert with
series that fire it and series that must not (another namespace, too little feedback, below the
threshold, too short)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart import NAMESPACE, one, render

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)

ALERTS = {
    "LoradockAdapterDrifting",
    "LoradockGeneralizationGap",
    "LoradockLiveAccuracyBelowValidation",
    "LoradockPodNotReady",
    "LoradockPredictQueueSaturated",
    "LoradockRequestsShed",
    "LoradockTrainingJobsFailing",
    "LoradockTrainingJobsStuck",
}


def rules(values: dict[str, Any] | None = None) -> dict[str, Any]:
    docs = render({"prometheusRule": {"enabled": True, **(values or {})}})
    return one(docs, "PrometheusRule")["spec"]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"namespace": NAMESPACE, **labels}
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def alert(name: str, at: str, *expected: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": list(expected)}


def fired(severity: str, annotations: dict[str, str], **labels: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": severity, "namespace": NAMESPACE, **labels},
        "exp_annotations": annotations,
    }


GAP_TEXT = {
    "summary": "Adapter ad_a overfits: validation loss exceeds training loss by 0.80",
    "description": "The live version of adapter ad_a fits its training rows much "
    "better than held-out rows. More or more varied data, fewer epochs or a smaller "
    "rank would help.",
}
LIVE_TEXT = {
    "summary": "Adapter ad_a is 20% less accurate live than on validation",
    "description": "Feedback (true labels from production) says the live version of "
    "adapter ad_a does worse than its validation score promised.",
}
NOT_READY_TEXT = {
    "summary": "loradock pod p1 is not ready",
    "description": "The pod answers /metrics but not /readyz: the base model is "
    "still loading, failed to load, or the registry is unreachable (its log says "
    "which).",
}
QUEUE_TEXT = {
    "summary": "loradock pod p1: the predict queue is 87.89% full",
    "description": "Predict requests wait for forward passes; near the limit "
    "(LORADOCK_MAX_QUEUE_ROWS) they are refused with 429. Add replicas or a GPU.",
}
SHED_TEXT = {
    "summary": "loradock refuses 10% of predict requests as overloaded",
    "description": "Requests are shed with 429 at the door: the queue's expected "
    "wait is over LORADOCK_MAX_QUEUE_WAIT_MS or it is full.",
}
FAILING_TEXT = {
    "summary": "5 training jobs failed in the last 1h",
    "description": "GET /v1/jobs?view=summary lists them with their errors "
    "(diverged, bad data, out of memory, a worker restart).",
}


def drift_text(adapter: str) -> dict[str, str]:
    return {
        "summary": f"Adapter {adapter} drifted",
        "description": f"The live inputs or predictions of adapter {adapter} no longer look like "
        f"its training data (GET /v1/adapters/{adapter}/monitoring names the signals). Retrain "
        "on recent data or check the client.",
    }


def cases() -> list[dict[str, Any]]:
    """promtool test cases: (input series, alerts expected at given times)."""
    adapters = {
        "interval": "1m",
        "input_series": [
            # drift: ad_a drifted for an hour; ad_b never; ad_c drifted in another namespace
            series("loradock_adapter_drifting", "1x60", adapter="ad_a", pod="p1"),
            series("loradock_adapter_drifting", "0x60", adapter="ad_b", pod="p1"),
            series(
                "loradock_adapter_drifting", "1x60", adapter="ad_c", pod="p1", namespace="other"
            ),
            # generalization gap: ad_a far above the 0.5 threshold, ad_b below
            series("loradock_adapter_generalization_gap", "0.8x60", adapter="ad_a", pod="p1"),
            series("loradock_adapter_generalization_gap", "0.2x60", adapter="ad_b", pod="p1"),
            # live accuracy: ad_a 20 points below validation on 80 items: fires; ad_b 30 points
            # below on only 10 items: waits for feedback; ad_c 5 points: within tolerance
            series("loradock_adapter_live_accuracy_gap", "0.2x60", adapter="ad_a", pod="p1"),
            series("loradock_adapter_feedback_items", "80x60", adapter="ad_a", pod="p1"),
            series("loradock_adapter_live_accuracy_gap", "0.3x60", adapter="ad_b", pod="p1"),
            series("loradock_adapter_feedback_items", "10x60", adapter="ad_b", pod="p1"),
            series("loradock_adapter_live_accuracy_gap", "0.05x60", adapter="ad_c", pod="p1"),
            series("loradock_adapter_feedback_items", "100x60", adapter="ad_c", pod="p1"),
        ],
        "alert_rule_test": [
            alert("LoradockAdapterDrifting", "20m"),  # not yet: `for: 30m`
            alert(
                "LoradockAdapterDrifting",
                "40m",
                fired("warning", drift_text("ad_a"), adapter="ad_a"),
            ),
            alert("LoradockGeneralizationGap", "10m"),
            alert(
                "LoradockGeneralizationGap",
                "20m",
                fired(
                    "info",
                    GAP_TEXT,
                    adapter="ad_a",
                ),
            ),
            alert(
                "LoradockLiveAccuracyBelowValidation",
                "40m",
                fired(
                    "warning",
                    LIVE_TEXT,
                    adapter="ad_a",
                ),
            ),
        ],
    }
    service = {
        "interval": "1m",
        "input_series": [
            series("loradock_ready", "0x30", pod="p1"),  # never became ready
            series("loradock_ready", "0 0 0 1x27", pod="p2"),  # loaded within 3 minutes
            series("loradock_queue_rows", "900x30", pod="p1"),  # 88% of 1024
            series("loradock_queue_rows", "100x30", pod="p2"),
            series("loradock_predict_failures_total", "0+10x30", reason="overloaded", pod="p1"),
            series("loradock_predict_requests_total", "0+100x30", pod="p1"),
            series(
                "loradock_training_jobs_finished_total", "0 1 2 3 4 5x25", status="failed", pod="p1"
            ),
            series("loradock_training_jobs_finished_total", "0+9x30", status="succeeded", pod="p1"),
        ],
        "alert_rule_test": [
            alert("LoradockPodNotReady", "5m"),
            alert(
                "LoradockPodNotReady",
                "15m",
                fired(
                    "critical",
                    NOT_READY_TEXT,
                    pod="p1",
                ),
            ),
            alert(
                "LoradockPredictQueueSaturated",
                "10m",
                fired(
                    "warning",
                    QUEUE_TEXT,
                    pod="p1",
                ),
            ),
            alert(
                "LoradockRequestsShed",
                "15m",
                fired(
                    "warning",
                    SHED_TEXT,
                ),
            ),
            alert("LoradockTrainingJobsFailing", "2m"),  # 2 failures: not more than 2
            alert(
                "LoradockTrainingJobsFailing",
                "10m",
                fired(
                    "warning",
                    FAILING_TEXT,
                ),
            ),
        ],
    }
    stuck_text = {
        "summary": "training jobs are queued and no job worker is alive",
        "description": "No pod runs training workers (LORADOCK_JOB_WORKERS=0 everywhere, or the "
        "trainer Deployment has no ready pod): queued jobs wait forever.",
    }
    stuck = {
        "interval": "1m",
        "input_series": [
            series("loradock_training_jobs", "2x60", state="queued", pod="p1"),
            series("loradock_job_workers_alive", "0x60", pod="p1"),
            series("loradock_training_jobs", "3x60", state="queued", pod="p2", namespace="b"),
            series("loradock_job_workers_alive", "1x60", pod="p2", namespace="b"),
        ],
        "alert_rule_test": [
            alert("LoradockTrainingJobsStuck", "20m"),
            alert("LoradockTrainingJobsStuck", "40m", fired("warning", stuck_text)),
        ],
    }
    return [adapters, service, stuck]


def test_every_alert_is_tested():
    names = {r["alert"] for g in rules()["groups"] for r in g["rules"]}
    assert names == ALERTS
    tested = {t["alertname"] for case in cases() for t in case["alert_rule_test"]}
    assert tested == ALERTS


def test_rules_pass_promtool_check_and_unit_tests(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rules()["groups"]}))
    checked = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": cases()}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    tested = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_wrong_expectation_fails_promtool(tmp_path):
    """The unit test above can fail: a series that fires where none is expected is caught."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rules()["groups"]}))
    case = cases()[0]
    case["alert_rule_test"] = [alert("LoradockAdapterDrifting", "40m")]  # it does fire
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [case]}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    tested = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert tested.returncode != 0
    assert "LoradockAdapterDrifting" in tested.stdout + tested.stderr


def test_thresholds_and_selector_come_from_values():
    spec = rules({
        "selector": 'namespace="ml",service=~"rel-loradock.*"',
        "generalizationGap": {"threshold": 1.25, "for": "1h", "severity": "warning"},
        "extraRules": [{"alert": "Mine", "expr": "vector(1)"}],
    })  # fmt: skip
    by_name = {r.get("alert"): r for g in spec["groups"] for r in g["rules"]}
    gap = by_name["LoradockGeneralizationGap"]
    assert gap["expr"].endswith("> 1.25")
    assert 'service=~"rel-loradock.*"' in gap["expr"]
    assert gap["for"] == "1h"
    assert gap["labels"]["severity"] == "warning"
    assert "Mine" in by_name
