"""Render helm/loradock offline with the real Helm engine (helm-python-sdk bundles Helm's SDK)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "loradock"
VALUES_DIR = Path(__file__).parent / "values"
INVALID_DIR = VALUES_DIR / "invalid"
RELEASE = "rel"
NAMESPACE = "ml"
FULLNAME = f"{RELEASE}-loradock"

Manifest = dict[str, Any]

# The good values files: what each one must render (kinds), NOTES.txt aside. The Pod is the
# `helm test` hook.
VALUES_FILES = {
    "cpu": {"Deployment", "Service", "ServiceAccount", "PersistentVolumeClaim", "Pod"},
    "gpu": {"Deployment", "Service", "ServiceAccount", "PersistentVolumeClaim", "Pod"},
    "multi-replica": {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "Pod"},
    "split": {
        "Deployment",
        "Service",
        "ServiceAccount",
        "ScaledObject",
        "PrometheusRule",
        "Ingress",
        "HTTPRoute",
        "NetworkPolicy",
        "ServiceMonitor",
        "Pod",
    },
    "everything": {
        "Pod",
        "Deployment",
        "Service",
        "ServiceAccount",
        "PersistentVolumeClaim",
        "Secret",
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    },
}


# Kinds a values file renders twice (the trainer/serving split: one per role).
DOUBLED = {"split": {"Deployment", "Service", "ScaledObject"}}


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text()) or {}


def render_text(values: dict[str, Any], chart_dir: Path = CHART_DIR) -> dict[str, str]:
    """Template path -> rendered text; schema violations raise HelmValuesError, `fail` raises
    HelmRenderError."""
    with helm_python.Chart.load(chart_dir) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def render(values: dict[str, Any], chart_dir: Path = CHART_DIR) -> list[Manifest]:
    docs = []
    for path, text in sorted(render_text(values, chart_dir).items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def component(doc: Manifest) -> str | None:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def one(docs: list[Manifest], kind: str, role: str = "server") -> Manifest:
    """The one object of `kind`; for kinds the trainer/serving split doubles (Deployment,
    Service, ScaledObject), the one of `role`."""
    found = [d for d in docs if d["kind"] == kind]
    if len(found) > 1:
        found = [d for d in found if component(d) == role]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[Manifest], role: str = "server") -> dict[str, Any]:
    """The loradock container (sidecars aside)."""
    containers = one(docs, "Deployment", role)["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == "loradock"]
    return found


def env_of(docs: list[Manifest], role: str = "server") -> dict[str, dict[str, Any]]:
    """Env var name -> its entry; names are checked unique."""
    entries = container(docs, role)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e for e in entries}
