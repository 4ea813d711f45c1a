"""The Helm chart, rendered by the real Helm engine for each values file and checked offline:
lint, Kubernetes schemas, and the properties a production deployment relies on."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loradock.service.metrics import Metrics
from loradock.service.settings import Settings
from tests.deploy.chart import (
    CHART_DIR,
    DOUBLED,
    FULLNAME,
    ROOT,
    VALUES_FILES,
    container,
    env_of,
    load_values,
    one,
    render,
)

SCHEMAS = Path(__file__).parent / "schemas"
# Objects without a schema in kubernetes-validate (custom resources) and the vendored subset
# that checks them instead.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
}


def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest known."""
    declared = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["kubeVersion"]
    oldest = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", declared)
    assert oldest, declared
    return [oldest.group(1), kubernetes_validate.latest_version()]


@pytest.fixture(scope="module", params=sorted(VALUES_FILES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(load_values(request.param))


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


# --- the chart as Helm sees it -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_lint_is_clean(name: str):
    report = helm_python.lint(CHART_DIR, load_values(name), strict=True)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert problems == [], problems


def test_each_values_file_renders_its_objects(rendered):
    name, docs = rendered
    assert {d["kind"] for d in docs} == VALUES_FILES[name]
    assert len(docs) == len(VALUES_FILES[name]) + len(DOUBLED.get(name, ()))


@pytest.mark.parametrize("version", kube_versions())
def test_every_manifest_matches_its_schema(rendered, version: str):
    _, docs = rendered
    for doc in docs:
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd:
            jsonschema.Draft7Validator(json.loads((SCHEMAS / crd).read_text())).validate(doc)
        else:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_bad_manifest():
    """The validators above do refuse broken objects (guards against a vacuous pass)."""
    docs = render(load_values("everything"))
    deployment = one(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUsr"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kube_versions()[0], strict=True)
    monitor = one(docs, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    schema = json.loads((SCHEMAS / "servicemonitor-monitoring-v1.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(monitor)


def test_selectors_match_the_pods(rendered):
    _, docs = rendered
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = [one(docs, "Deployment")["spec"]["selector"]["matchLabels"]]
    selectors.append(one(docs, "Service")["spec"]["selector"])
    selectors += [
        d["spec"]["selector"]["matchLabels"]
        for d in docs
        if d["kind"] in {"PodDisruptionBudget", "ServiceMonitor"}
    ]
    for selector in selectors:
        assert selector
        assert selector.items() <= pod_labels.items()


# --- pod hardening -----------------------------------------------------------------------------


def test_security_context_is_hardened(rendered):
    _, docs = rendered
    pod = pod_spec(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] > 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True


def test_everything_written_goes_to_a_volume(rendered):
    """With a read-only root filesystem the data dir, /tmp and every cache must be mounts."""
    _, docs = rendered
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    env = env_of(docs)
    assert env["LORADOCK_DATA_DIR"]["value"] == "/data"
    assert mounts["/data"] in volumes
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME"):
        assert env[name]["value"].startswith("/tmp"), name


# --- probes and shutdown -----------------------------------------------------------------------


def test_probes_use_health_and_readiness_with_a_long_startup_budget(rendered):
    _, docs = rendered
    c = container(docs)
    [port] = [p for p in c["ports"] if p["name"] == "http"]
    assert env_of(docs)["LORADOCK_PORT"]["value"] == str(port["containerPort"])
    probes = {k: c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["httpGet"]["port"] == "http"
    startup = probes["startupProbe"]
    # Loading and warming up the base model: minutes, not the liveness probe's seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert "initialDelaySeconds" not in probes["livenessProbe"]


def test_termination_grace_covers_prestop_drain_and_shutdown(rendered):
    """The kubelet's grace period runs from preStop on: sleep, drain and the server's own grace
    must fit in it, or in-flight requests are killed."""
    _, docs = rendered
    env = env_of(docs)
    command = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0  # endpoints need a moment to drop the pod
    drain = float(env["LORADOCK_DRAIN_SECONDS"]["value"])
    shutdown = float(env["LORADOCK_SHUTDOWN_GRACE_SECONDS"]["value"])
    grace = pod_spec(docs)["terminationGracePeriodSeconds"]
    assert grace >= math.ceil(pre_stop + drain + shutdown) + 5


def test_default_grace_is_computed_from_the_settings():
    values = {"lifecycle": {"preStopSleepSeconds": 7}, "config": {"drain_seconds": 3.5}}
    values["config"]["shutdown_grace_seconds"] = 40
    assert pod_spec(render(values))["terminationGracePeriodSeconds"] == 7 + 44 + 5


def test_a_grace_period_shorter_than_shutdown_fails():
    with pytest.raises(helm_python.HelmRenderError, match="terminationGracePeriodSeconds 30 < 40"):
        render({"terminationGracePeriodSeconds": 30})


def test_sqlite_or_local_store_recreates_instead_of_rolling():
    assert one(render({}), "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    multi = one(render(load_values("multi-replica")), "Deployment")["spec"]
    assert multi["replicas"] == 3
    assert multi["strategy"]["type"] == "RollingUpdate"
    assert multi["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# --- settings and secrets ----------------------------------------------------------------------


def test_config_becomes_settings_the_server_accepts(monkeypatch):
    docs = render(load_values("everything"))
    for name, entry in env_of(docs).items():
        if name.startswith("LORADOCK_") and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    settings = Settings()
    assert settings.host == "0.0.0.0"  # noqa: S104
    assert str(settings.data_dir) == "/data"
    assert settings.max_body_bytes == 67108864  # not 6.7108864e+07
    assert settings.serve_target_modules == ["query", "key", "value"]
    assert settings.shutdown_grace_seconds == 30.5
    assert settings.drain_seconds == 5
    assert settings.device == "cuda:0"
    assert settings.log_level == "debug"
    assert settings.store_url == "s3://loradock-artifacts/staging"


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_every_loradock_variable_is_a_setting(name: str):
    """A LORADOCK_* variable the server does not know is silently ignored: refuse them here."""
    known = {f"LORADOCK_{field.upper()}" for field in Settings.model_fields}
    rendered = {n for n in env_of(render(load_values(name))) if n.startswith("LORADOCK_")}
    assert rendered - known == set()


def test_secrets_reach_the_pod_only_by_secret_key_ref():
    values = load_values("everything")
    docs = render(values)
    env = env_of(docs)
    refs = {n: e["valueFrom"]["secretKeyRef"] for n, e in env.items() if "valueFrom" in e}
    assert refs == {
        "LORADOCK_DATABASE_URL": {"name": FULLNAME, "key": "database-url"},
        "LORADOCK_ADMIN_KEY": {"name": FULLNAME, "key": "admin-key"},
        "AWS_ACCESS_KEY_ID": {"name": "loradock-s3", "key": "access-key"},
        "AWS_SECRET_ACCESS_KEY": {"name": "loradock-s3", "key": "secret-key"},
    }
    for name in refs:
        assert "value" not in env[name]
    secret = one(docs, "Secret")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "database-url": values["database"]["url"],
        "admin-key": "ld_admin_0123456789abcdef",
    }
    # The plain texts appear nowhere else: not in env, annotations or NOTES.
    everything = json.dumps([d for d in docs if d["kind"] != "Secret"])
    assert "s3cret-password" not in everything
    assert "ld_admin_0123456789abcdef" not in everything


def test_existing_secrets_are_referenced_and_none_is_created():
    docs = render(load_values("multi-replica"))
    assert "Secret" not in {d["kind"] for d in docs}
    env = env_of(docs)
    assert env["LORADOCK_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "loradock-db",
        "key": "url",
    }
    assert env["LORADOCK_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "loradock-admin",
        "key": "admin-key",
    }
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.storage.svc:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["key"] == "AWS_ACCESS_KEY_ID"


def test_defaults_use_sqlite_and_the_local_store_on_the_volume():
    docs = render({})
    env = env_of(docs)
    assert "Secret" not in {d["kind"] for d in docs}
    assert not {"LORADOCK_DATABASE_URL", "LORADOCK_STORE_URL", "LORADOCK_ADMIN_KEY"} & set(env)
    assert not [n for n in env if n.startswith("AWS_")]
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "data")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_secret_changes_roll_the_pods():
    def checksum(url: str) -> str:
        deployment = one(render({"database": {"url": url}}), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]

    assert checksum("postgresql://a@db/x") != checksum("postgresql://b@db/x")


@pytest.mark.parametrize(
    ("persistence", "volume"),
    [
        ({"existingClaim": "my-data"}, {"persistentVolumeClaim": {"claimName": "my-data"}}),
        ({"enabled": False}, {"emptyDir": {}}),
    ],
)
def test_data_volume_choices(persistence: dict, volume: dict):
    docs = render({"persistence": persistence})
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    data = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "data")
    assert data == {"name": "data", **volume}


@pytest.mark.parametrize(("storage_class", "rendered"), [("fast-ssd", "fast-ssd"), ("-", "")])
def test_storage_class(storage_class: str, rendered: str):
    claim = one(render({"persistence": {"storageClass": storage_class}}), "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == rendered


# --- GPU ---------------------------------------------------------------------------------------


def test_gpu_values_request_a_gpu_on_a_gpu_node():
    docs = render(load_values("gpu"))
    pod = pod_spec(docs)
    c = container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["memory"] == "16Gi"  # the user's limits are kept
    assert c["image"].endswith(":0.1.0-cuda")
    assert env_of(docs)["LORADOCK_DEVICE"]["value"] == "cuda"  # no silent CPU fallback
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeAffinity" in pod["affinity"]


def test_cpu_values_request_no_gpu():
    docs = render(load_values("cpu"))
    assert "nvidia.com/gpu" not in json.dumps(docs)
    assert "LORADOCK_DEVICE" not in env_of(docs)
    assert container(docs)["image"] == "loradock:0.1.0"
    assert "runtimeClassName" not in pod_spec(docs)


def test_an_explicit_device_wins_over_the_gpu_default():
    env = env_of(render(load_values("everything")))
    assert env["LORADOCK_DEVICE"]["value"] == "cuda:0"


# --- metrics, autoscaling, disruption budget, dashboard ----------------------------------------


def exported_metrics() -> dict[str, str]:
    text = Metrics().render()[0].decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_prometheus_annotations_point_at_the_metrics_port():
    docs = render({})
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["LORADOCK_METRICS_PORT"] == str(ports["metrics"])
    assert env["LORADOCK_METRICS_HOST"] == "0.0.0.0"  # noqa: S104 - in the pod
    # metrics back on the API port when the chart is told so
    docs = render({"metrics": {"port": None}})
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(container(docs)["ports"][0]["containerPort"])
    assert "LORADOCK_METRICS_PORT" not in {e["name"] for e in container(docs)["env"]}


def test_network_policy_keeps_metrics_internal():
    docs = render({"networkPolicy": {"enabled": True}})
    policy = one(docs, "NetworkPolicy")
    api, metrics = policy["spec"]["ingress"]
    assert api["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert "from" not in api  # the API: from anywhere
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]  # fmt: skip
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= one(docs, "Deployment")["spec"]["template"]["metadata"][
        "labels"].items()  # fmt: skip


def test_service_monitor_scrapes_the_service_port():
    docs = render(load_values("everything"))
    monitor = one(docs, "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in one(docs, "Service")["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}


def test_autoscaler_scales_the_deployment_on_an_exported_queue_gauge():
    docs = render(load_values("everything"))
    hpa = one(docs, "HorizontalPodAutoscaler")
    deployment = one(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == [
        {
            "metric": {"name": "loradock_queue_rows"},
            "target": {"type": "AverageValue", "averageValue": "32"},
        }
    ]
    assert exported_metrics()["loradock_queue_rows"] == "gauge"
    cpu = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu[0]["target"] == {"type": "Utilization", "averageUtilization": 75}


def test_disruption_budget():
    assert (
        one(render(load_values("multi-replica")), "PodDisruptionBudget")["spec"]["maxUnavailable"]
        == 1
    )
    assert one(render(load_values("everything")), "PodDisruptionBudget")["spec"] == {
        "minAvailable": "50%",
        "selector": {
            "matchLabels": {
                "app.kubernetes.io/name": "loradock",
                "app.kubernetes.io/instance": "rel",
                "app.kubernetes.io/component": "server",
            }
        },
    }


def test_dashboard_config_map_carries_the_dashboard_file():
    config_map = one(render(load_values("everything")), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    dashboard = json.loads((CHART_DIR / "dashboards" / "loradock.json").read_text())
    assert json.loads(config_map["data"]["loradock.json"]) == dashboard


def test_readme_values_examples_render():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(examples) >= 2  # the GPU and the multi-replica values
    for example in examples:
        docs = render(yaml.safe_load(example))
        for doc in docs:
            crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
            if crd:
                jsonschema.Draft7Validator(json.loads((SCHEMAS / crd).read_text())).validate(doc)
            else:
                kubernetes_validate.validate(doc, kube_versions()[-1], strict=True)


# --- torch threads from the CPU request --------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu", "threads"),
    [("1", "1"), ("500m", "1"), ("1500m", "2"), (2, "2"), (2.5, "3"), ("4", "4"), ("100m", "1")],
)
def test_threads_follow_the_cpu_request_rounded_up(cpu, threads):
    values = load_values("cpu")
    values["resources"] = {"requests": {"cpu": cpu, "memory": "2Gi"}}
    assert env_of(render(values))["LORADOCK_THREADS"]["value"] == threads


def test_an_explicit_threads_setting_wins_and_no_request_sets_none():
    values = load_values("cpu")
    values["resources"] = {"requests": {"cpu": "8"}}
    values.setdefault("config", {})["threads"] = 3
    assert env_of(render(values))["LORADOCK_THREADS"]["value"] == "3"
    # no CPU request (null removes the chart's default): the process decides
    values["resources"] = {"requests": {"cpu": None}}
    del values["config"]["threads"]
    assert "LORADOCK_THREADS" not in env_of(render(values))


def test_the_default_values_run_one_thread_per_requested_cpu():
    env = env_of(render({}))
    assert env["LORADOCK_THREADS"]["value"] == "1"  # values.yaml requests cpu "1"


# --- operations: the trainer/serving split, KEDA, routes, helm test --------------------------


def test_split_runs_training_only_in_the_trainer_deployment():
    docs = render(load_values("split"))
    server, trainer = one(docs, "Deployment", "server"), one(docs, "Deployment", "trainer")
    assert trainer["metadata"]["name"] == f"{FULLNAME}-trainer"
    assert env_of(docs, "server")["LORADOCK_JOB_WORKERS"]["value"] == "0"
    assert (
        env_of(docs, "trainer")["LORADOCK_JOB_WORKERS"]["value"] == "2"
    )  # config.job_workers: 3 loses
    # Each role's threads follow its own CPU request; the trainer has its own nodes.
    assert env_of(docs, "server")["LORADOCK_THREADS"]["value"] == "2"  # 1500m
    assert env_of(docs, "trainer")["LORADOCK_THREADS"]["value"] == "4"
    assert container(docs, "trainer")["resources"]["requests"]["cpu"] == "4"
    assert trainer["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "training"}
    assert "nodeSelector" not in server["spec"]["template"]["spec"]
    # Selectors never overlap: each Deployment and Service picks its own role's pods.
    for deployment, role in ((server, "server"), (trainer, "trainer")):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector["app.kubernetes.io/component"] == role
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    api = one(docs, "Service", "server")
    assert api["spec"]["selector"]["app.kubernetes.io/component"] == "server"
    headless = one(docs, "Service", "trainer")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"]["app.kubernetes.io/component"] == "trainer"
    # KEDA owns both replica counts.
    assert "replicas" not in server["spec"]
    assert "replicas" not in trainer["spec"]
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in docs if o["kind"] == "ScaledObject"}
    assert set(scaled) == {FULLNAME, f"{FULLNAME}-trainer"}
    queue = scaled[FULLNAME]["spec"]["triggers"][0]["metadata"]
    assert "loradock_queue_rows" in queue["query"]
    assert scaled[f"{FULLNAME}-trainer"]["spec"]["minReplicaCount"] == 0
    assert 'state=~"queued|running"' in scaled[f"{FULLNAME}-trainer"]["spec"]["triggers"][0][
        "metadata"]["query"]  # fmt: skip


def test_split_pods_are_the_same_pod_but_for_their_role():
    docs = render(load_values("split"))
    server, trainer = (one(docs, "Deployment", r)["spec"]["template"]["spec"]
                       for r in ("server", "trainer"))  # fmt: skip
    for spec in (server, trainer):
        assert [c["name"] for c in spec["initContainers"]] == ["wait-for-postgres"]
        assert [c["name"] for c in spec["containers"]] == ["loradock", "log-shipper"]
    same = ("image", "securityContext", "volumeMounts", "envFrom", "startupProbe", "ports")
    for key in same:
        assert server["containers"][0][key] == trainer["containers"][0][key], key
    env = env_of(docs)
    assert env["OTEL_SERVICE_NAME"]["value"] == "rel-loradock"  # extraEnv is templated
    assert container(docs)["envFrom"] == [{"secretRef": {"name": "otel-credentials"}}]
    assert env["LORADOCK_TRACING"]["value"] == "otlp"


def test_ingress_and_route_keep_event_streams_open():
    docs = render(load_values("split"))
    ingress = one(docs, "Ingress")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert notes["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == "64m"  # config.max_body_bytes
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    assert [p["path"] for p in paths] == ["/v1", "/v2"]
    assert {p["backend"]["service"]["name"] for p in paths} == {FULLNAME}
    route = one(docs, "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    assert rule["timeouts"] == {"request": "0s"}
    assert rule["backendRefs"] == [{"name": FULLNAME, "port": 8000}]
    assert route["spec"]["hostnames"] == ["loradock.example.com"]


def test_helm_test_pod_checks_readiness_through_the_service():
    pod = one(render({}), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (probe,) = pod["spec"]["containers"]
    script = probe["command"][-1]
    assert f"http://{FULLNAME}:8000" in script
    assert "/readyz" in script
    assert "/v2/health/ready" in script
    assert probe["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["restartPolicy"] == "Never"
    assert not [d for d in render({"helmTest": {"enabled": False}}) if d["kind"] == "Pod"]
