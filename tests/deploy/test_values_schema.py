"""values.schema.json (and the chart's own checks) refuse values that would deploy something
broken or unsafe; its `config` section is the server's Settings, so the two cannot drift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import pytest
import yaml

from loradock.service.settings import Settings
from tests.deploy.chart import CHART_DIR, INVALID_DIR, render

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
# Settings the chart sets itself (from database, store, auth and the container layout).
CHART_OWNED = {"host", "port", "data_dir", "database_url", "store_url", "admin_key"}
# What a config entry keeps of a Settings field's JSON schema.
KEPT = ("type", "enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def invalid_cases() -> list[Any]:
    cases = []
    for path in sorted(INVALID_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# refused: "), f"{path.name} must say why it is refused"
        cases.append(pytest.param(path, first.removeprefix("# refused: "), id=path.stem))
    return cases


@pytest.mark.parametrize(("path", "reason"), invalid_cases())
def test_invalid_values_are_refused(path: Path, reason: str):
    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError)) as refused:
        render(yaml.safe_load(path.read_text()))
    assert reason in str(refused.value)


def test_the_schema_is_draft_07_and_accepts_the_defaults():
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    jsonschema.Draft7Validator(SCHEMA).validate(defaults)


@pytest.mark.parametrize(
    ("replicas", "message"),
    [
        ({"replicaCount": 2}, "2 replicas cannot share SQLite"),
        (
            {"replicaCount": 2, "database": {"existingSecret": "db"}},
            "2 replicas cannot share the local artifact store",
        ),
        (
            {
                "replicaCount": 2,
                "database": {"url": "postgresql://db/x"},
                "store": {"url": "s3://b"},
            },
            "2 replicas cannot mount one [ReadWriteOnce] volume",
        ),
    ],
)
def test_the_templates_refuse_unsafe_replicas_without_the_schema(
    tmp_path: Path, replicas: dict, message: str
):
    """`helm install --skip-schema-validation` still cannot put two pods on one SQLite file."""
    chart = tmp_path / "loradock"
    shutil.copytree(CHART_DIR, chart)
    (chart / "values.schema.json").unlink()
    with pytest.raises(helm_python.HelmRenderError, match=message.replace("[", r"\[")):
        render(replicas, chart_dir=chart)


def expected_config_entry(field_schema: dict[str, Any]) -> dict[str, Any]:
    """A Settings field's JSON schema as values.schema.json states it (null = leave unset)."""
    schema = dict(field_schema)
    nullable = False
    if "anyOf" in schema:
        branches = [b for b in schema.pop("anyOf") if b.get("type") != "null"]
        assert len(branches) == 1, field_schema
        nullable = True
        schema.update(branches[0])
    entry = {k: schema[k] for k in KEPT if k in schema}
    if "items" in schema:
        entry["items"] = schema["items"]
    if nullable:
        entry["type"] = [entry["type"], "null"]
    return entry


def test_config_lists_every_setting_with_its_limits():
    settings = Settings.model_json_schema()["properties"]
    expected = {n: expected_config_entry(s) for n, s in settings.items() if n not in CHART_OWNED}
    config = SCHEMA["properties"]["config"]
    assert config["additionalProperties"] is False
    actual = {
        name: {k: v for k, v in entry.items() if k != "description"}
        for name, entry in config["properties"].items()
    }
    missing = {n: e for n, e in expected.items() if actual.get(n) != e}
    assert not missing, (
        "helm/loradock/values.schema.json properties.config.properties is out of date with "
        f"service/settings.py; expected entries: {json.dumps(missing, indent=2)}"
    )
    assert set(actual) == set(expected), f"not settings: {set(actual) - set(expected)}"
