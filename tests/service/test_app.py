"""The app in-process (TestClient, tiny BERT): health, readiness, metrics, auth, errors, limits."""

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from loradock.service.app import create_app
from loradock.service.runtime import Phase
from loradock.service.settings import Settings

PROBLEM = "application/problem+json"


def metric_value(text, name, labels=None):
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or labels.items() <= sample.labels.items()):
                return sample.value
    return None


def assert_problem(resp, status, detail_part=None):
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["status"] == status
    assert body["type"].startswith("urn:loradock:problem:")
    assert body["title"]
    assert "Traceback" not in resp.text
    assert "/work/" not in resp.text
    assert "site-packages" not in resp.text
    if detail_part:
        assert detail_part in body["detail"]
    return body


def test_health_and_readiness(app_client):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["base_model"]["model_type"] == "bert"
    assert ready.json()["base_model"]["hidden_size"] == 32


def test_not_ready_before_start(settings):
    app = create_app(settings)
    client = TestClient(app)  # no `with`: the lifespan (and so the model load) has not run
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["status"] == "starting"
    assert client.get("/healthz").status_code == 200
    assert_problem(client.get("/v1/tenants"), 503, "starting")


def test_failed_start_reports_and_calls_on_fatal(tmp_path, tiny_bert_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_bert_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"garbage")
    fatal = []
    app = create_app(Settings(data_dir=tmp_path / "d", base_model=broken), on_fatal=fatal.append)
    with TestClient(app) as client:
        assert app.state.runtime.wait_until_settled(60) is Phase.FAILED
        resp = client.get("/readyz")
        assert resp.status_code == 503
        assert "could not load base model" in resp.json()["error"]
        assert "retry-after" not in resp.headers  # waiting will not fix a failed start
        # Keys cannot even be checked without the registry: 503 before authentication.
        api = client.get("/v1/adapters", headers={"Authorization": "Bearer x"})
        assert_problem(api, 503, "failed to start")
        assert "retry-after" not in api.headers
    assert len(fatal) == 1


def test_metrics_exports_build_and_base_model(app_client):
    app_client.get("/healthz")
    text = app_client.get("/metrics").text
    build = next(
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "loradock_build_info"
    )
    assert build.labels["torch"].startswith("2.")
    assert build.labels["version"]
    assert metric_value(text, "loradock_base_model_load_seconds") > 0
    assert metric_value(text, "loradock_base_model_parameters") > 10_000
    assert metric_value(text, "loradock_ready") == 1
    assert metric_value(text, "process_resident_memory_bytes") > 0
    count = metric_value(
        text, "loradock_http_requests_total", {"route": "/healthz", "status": "200"}
    )
    assert count >= 1


def test_metrics_route_label_is_the_template_not_the_path(app_client):
    for i in range(3):
        app_client.delete(f"/v1/keys/key_nothing{i}")
    text = app_client.get("/metrics").text
    labels = {
        s.labels["route"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "loradock_http_requests_total"
    }
    assert "/v1/keys/{key_id}" in labels
    assert not any("key_nothing" in label for label in labels)


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        (None, "missing Authorization header"),
        ("Basic dXNlcjpwYXNz", "must be 'Bearer"),
        ("Bearer ", "must be 'Bearer"),
        ("Bearer ldk_not_a_real_key", "invalid or revoked"),
    ],
)
def test_auth_is_required(app_client, header, detail):
    headers = {"Authorization": header} if header is not None else {}
    client = TestClient(app_client.app)
    resp = client.get("/v1/tenants", headers=headers)
    body = assert_problem(resp, 401, detail)
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert body["instance"] == "/v1/tenants"


def test_tenant_and_key_lifecycle(app_client):
    created = app_client.post("/v1/tenants", json={"name": "acme"})
    assert created.status_code == 201
    tenant_id = created.json()["id"]
    assert tenant_id.startswith("tn_")
    assert_problem(app_client.post("/v1/tenants", json={"name": "acme"}), 409, "acme")
    names = [t["name"] for t in app_client.get("/v1/tenants").json()["tenants"]]
    assert names == ["default", "acme"]

    key = app_client.post(f"/v1/tenants/{tenant_id}/keys", json={"scopes": ["predict"]})
    assert key.status_code == 201
    secret, key_id = key.json()["key"], key.json()["id"]
    assert key.json()["scopes"] == ["predict"]

    other = TestClient(app_client.app, headers={"Authorization": f"Bearer {secret}"})
    assert_problem(other.get("/v1/tenants"), 403, "'admin' scope")

    assert app_client.delete(f"/v1/keys/{key_id}").status_code == 204
    assert_problem(other.get("/v1/tenants"), 401, "revoked")
    assert_problem(app_client.delete(f"/v1/keys/{key_id}"), 404)


def test_keys_for_unknown_tenant_are_404(app_client):
    assert_problem(
        app_client.post("/v1/tenants/tn_nope/keys", json={"scopes": ["train"]}), 404, "tn_nope"
    )


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "body"),
        ({"json": {"name": 42}}, "name"),
        ({"json": {"name": "../etc"}}, "name"),
        ({"json": {"name": "ok", "extra": 1}}, "extra"),
        ({"json": []}, "body"),
    ],
)
def test_bad_input_is_a_422_problem(app_client, kwargs, detail):
    body = assert_problem(app_client.post("/v1/tenants", **kwargs), 422, detail)
    assert body["errors"]
    assert app_client.get("/healthz").status_code == 200


def test_bad_scopes_are_422(app_client):
    tenant_id = app_client.get("/v1/tenants").json()["tenants"][0]["id"]
    assert_problem(app_client.post(f"/v1/tenants/{tenant_id}/keys", json={"scopes": []}), 422)
    assert_problem(app_client.post(f"/v1/tenants/{tenant_id}/keys", json={"scopes": ["root"]}), 422)


def test_unknown_route_and_method_are_problems(app_client):
    assert_problem(app_client.get("/v1/nothing-here"), 404, "/v1/nothing-here")
    assert_problem(app_client.put("/healthz"), 405)


def test_oip_paths_answer_in_their_protocol(app_client):
    resp = app_client.get("/v2/no-such-route")
    assert resp.status_code == 404
    assert set(resp.json()) == {"error"}


@pytest.fixture
def small_body_client(tmp_path, tiny_bert_dir):
    app = create_app(
        Settings(data_dir=tmp_path / "d", base_model=tiny_bert_dir, max_body_bytes=1024)
    )
    with TestClient(app) as client:
        app.state.runtime.wait_until_settled(60)
        key = (tmp_path / "d" / "bootstrap-key").read_text().strip()
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


def test_oversize_body_is_413_with_length(small_body_client):
    resp = small_body_client.post("/v1/tenants", content=b"x" * 5000)
    assert_problem(resp, 413, "LORADOCK_MAX_BODY_BYTES")
    assert small_body_client.get("/healthz").status_code == 200


def test_oversize_chunked_body_is_413(small_body_client):
    def chunks():
        for _ in range(10):
            yield b"y" * 500

    resp = small_body_client.post(
        "/v1/tenants", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(resp, 413, "1024")


def test_small_chunked_body_passes_through(small_body_client):
    def chunks():
        yield b'{"name": '
        yield b'"chunky"}'

    resp = small_body_client.post(
        "/v1/tenants", content=chunks(), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["name"] == "chunky"


def test_openapi_lists_the_routes(app_client):
    paths = app_client.get("/openapi.json").json()["paths"]
    for path in ("/healthz", "/readyz", "/metrics", "/v1/tenants", "/v1/keys/{key_id}"):
        assert path in paths


def test_admin_key_from_settings_is_the_bootstrap_key(tmp_path, tiny_bert_dir, metrics):
    key = "k8s-secret-admin-key-abcdefghijklmnop"
    settings = Settings(data_dir=tmp_path / "d", base_model=tiny_bert_dir, admin_key=key)
    assert key not in str(settings.public())  # never shown in logs or settings dumps
    app = create_app(settings, metrics=metrics)
    with TestClient(app) as client:
        assert app.state.runtime.wait_until_settled(60) is Phase.READY
        ok = client.get("/v1/tenants", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert_problem(client.get("/v1/tenants", headers={"Authorization": "Bearer nope"}), 401)
    assert not (tmp_path / "d" / "bootstrap-key").exists()
