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

# The good values files: what each one must render (kinds), NOTES.txt aside.
VALUES_FILES = {
    "cpu": {"Deployment", "Service", "ServiceAccount", "PersistentVolumeClaim"},
    "gpu": {"Deployment", "Service", "ServiceAccount", "PersistentVolumeClaim"},
    "multi-replica": {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"},
    "everything": {
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


def one(docs: list[Manifest], kind: str) -> Manifest:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[Manifest]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(docs: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Env var name -> its entry; names are checked unique."""
    entries = container(docs)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e for e in entries}
