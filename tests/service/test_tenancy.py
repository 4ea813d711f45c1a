"""Isolation rules, driven by the OpenAPI document so that a new route cannot escape them:
every operation has a declared scope; every id-taking route answers another tenant 404 (exactly
like a missing id) and leaves the owner's objects untouched; scopes are enforced per route; a
revoked key is 401; admin keys never reach customer tenants."""

import pytest
from fastapi.testclient import TestClient

from tests.service.test_app import assert_problem
from tests.service.test_predict_api import TEXTS, trained

# (method, path) -> scope the route needs; None = no authentication.
SCOPES = {
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): None,
    ("GET", "/v2/health/live"): None,
    ("GET", "/v2/health/ready"): None,
    ("GET", "/v2"): None,
    ("GET", "/v1/tenants"): "admin",
    ("POST", "/v1/tenants"): "admin",
    ("POST", "/v1/tenants/{tenant_id}/keys"): "admin",
    ("DELETE", "/v1/keys/{key_id}"): "admin",
    ("POST", "/v1/keys/{key_id}/rotate"): "admin",
    ("GET", "/v1/keys"): "admin",
    ("DELETE", "/v1/tenants/{tenant_id}"): "admin",
    ("GET", "/v1/whoami"): "predict",  # any key: every scope includes reading
    ("GET", "/v1/adapters"): "predict",
    ("POST", "/v1/adapters"): "train",
    ("POST", "/v1/adapters/import"): "train",
    ("GET", "/v1/adapters/{adapter}"): "predict",
    ("DELETE", "/v1/adapters/{adapter}"): "train",
    ("POST", "/v1/adapters/{adapter}/versions"): "train",
    ("GET", "/v1/adapters/{adapter}/versions/{version}"): "predict",
    ("POST", "/v1/adapters/{adapter}/versions/{version}/promote"): "train",
    ("GET", "/v1/adapters/{adapter}/download"): "predict",
    ("GET", "/v1/adapters/{adapter}/export"): "predict",
    ("POST", "/v1/adapters/{adapter}/batch"): "predict",
    ("GET", "/v1/jobs/{job_id}/results"): "predict",
    ("POST", "/v1/adapters/{adapter}/predict"): "predict",
    ("POST", "/v1/embeddings"): "predict",
    ("POST", "/v1/chat/completions"): "predict",
    ("POST", "/v1/completions"): "predict",
    ("GET", "/v1/models"): "predict",
    ("POST", "/v1/files"): "train",
    ("GET", "/v1/files"): "predict",
    ("GET", "/v1/files/{file_id}"): "predict",
    ("GET", "/v1/files/{file_id}/content"): "predict",
    ("DELETE", "/v1/files/{file_id}"): "train",
    ("POST", "/v1/fine_tuning/jobs"): "train",
    ("GET", "/v1/fine_tuning/jobs"): "predict",
    ("GET", "/v1/fine_tuning/jobs/{job_id}"): "predict",
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): "train",
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): "predict",
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): "predict",
    ("POST", "/v1/adapters/{adapter}/feedback"): "predict",
    ("GET", "/v1/adapters/{adapter}/monitoring"): "predict",
    ("GET", "/v1/jobs"): "predict",
    ("GET", "/v1/jobs/{job_id}"): "predict",
    ("POST", "/v1/jobs/{job_id}/cancel"): "train",
    ("GET", "/v1/jobs/{job_id}/events"): "predict",
    ("GET", "/v2/models/{model}"): "predict",
    ("GET", "/v2/models/{model}/ready"): "predict",
    ("GET", "/v2/models/{model}/versions/{version}"): "predict",
    ("GET", "/v2/models/{model}/versions/{version}/ready"): "predict",
    ("POST", "/v2/models/{model}/infer"): "predict",
    ("POST", "/v2/models/{model}/versions/{version}/infer"): "predict",
}
INFER = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["refund"]}]}
BODIES = {
    "/v1/adapters/{adapter}/predict": {"inputs": TEXTS},
    "/v1/adapters/{adapter}/batch": {"inputs": TEXTS},
    "/v1/adapters/{adapter}/feedback": {"items": [{"text": "refund", "label": "billing"}]},
    "/v1/adapters/{adapter}/versions": {"training_data": [{"text": "a", "label": "b"}] * 4},
    "/v2/models/{model}/infer": INFER,
    "/v2/models/{model}/versions/{version}/infer": INFER,
}


def operations(app):
    return [(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops]


def key_for(client, tenant_id, scopes):
    resp = client.post(f"/v1/tenants/{tenant_id}/keys", json={"scopes": scopes})
    assert resp.status_code == 201, resp.text
    return resp.json()


class as_key:  # reads like a function at the call sites
    """The same TestClient (so the same event loop as the app's batcher) with another key."""

    def __init__(self, client, key):
        self.client, self.headers = client, {"Authorization": f"Bearer {key}"}

    def request(self, method, url, **kw):
        return self.client.request(method, url, headers=self.headers, **kw)

    def get(self, url, **kw):
        return self.request("GET", url, **kw)

    def post(self, url, **kw):
        return self.request("POST", url, **kw)

    def delete(self, url, **kw):
        return self.request("DELETE", url, **kw)


def call(client, method, path, ids):
    url = path.format(**ids)
    body = BODIES.get(path)
    return client.request(method, url, json=body) if body else client.request(method, url)


@pytest.fixture
def world(app_client):
    """The owner tenant with a trained adapter and its job; another tenant with its own keys."""
    adapter_id = trained(app_client)
    job_id = app_client.get("/v1/jobs").json()["jobs"][0]["id"]
    owner = app_client.get("/v1/tenants").json()["tenants"][0]["id"]
    other = app_client.post("/v1/tenants", json={"name": "other"}).json()["id"]
    upload = app_client.post("/v1/files", files={"file": ("t.jsonl", b'{"prompt": "a"}\n')},
                             data={"purpose": "fine-tune"})  # fmt: skip
    assert upload.status_code == 200, upload.text
    return {
        "ids": {
            "adapter": adapter_id,
            "model": adapter_id,
            "version": 1,
            "job_id": job_id,
            "file_id": upload.json()["id"],
        },
        "owner": owner,
        "other": other,
    }


def test_every_operation_has_a_declared_scope(app_client):
    assert set(operations(app_client.app)) == set(SCOPES)


def test_another_tenants_ids_answer_404_on_every_route(app_client, world):
    outsider = as_key(app_client, key_for(app_client, world["other"], ["train", "predict"])["key"])
    by_name = {**world["ids"], "adapter": "tickets", "model": "tickets"}
    checked = 0
    for method, path in operations(app_client.app):
        if "{" not in path or SCOPES[(method, path)] in (None, "admin"):
            continue
        for ids in (world["ids"], by_name):
            resp = call(outsider, method, path, ids)
            where = f"{method} {path} -> {resp.status_code} {resp.text[:200]}"
            assert resp.status_code == 404, where
            if path.startswith("/v2"):
                assert set(resp.json()) == {"error"}, where
            elif path.startswith(("/v1/files", "/v1/fine_tuning")):  # OpenAI's error shape
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}, where
            else:
                assert_problem(resp, 404)
            checked += 1
    assert checked >= 2 * 15
    # nothing the outsider tried changed the owner's adapter: same live version, still serving
    adapter = app_client.get("/v1/adapters/tickets").json()
    assert adapter["live_version"] == 1
    assert adapter["status"] == "ready"
    assert len(adapter["versions"]) == 1
    assert (
        app_client.post("/v1/adapters/tickets/predict", json={"inputs": TEXTS}).status_code == 200
    )


@pytest.mark.parametrize("scopes", [["predict"], ["train"], ["train", "predict"]])
def test_scopes_are_enforced_per_route(app_client, world, scopes):
    caller = as_key(app_client, key_for(app_client, world["owner"], scopes)["key"])
    granted = set(scopes) | ({"predict"} if "train" in scopes else set())  # train may also read
    for method, path in operations(app_client.app):
        needed = SCOPES[(method, path)]
        if needed is None or (method, path) == ("DELETE", "/v1/adapters/{adapter}"):
            continue
        resp = call(caller, method, path, {**world["ids"], "tenant_id": world["owner"],
                                           "key_id": "key_missing"})  # fmt: skip
        where = f"{scopes} {method} {path} -> {resp.status_code} {resp.text[:200]}"
        if needed in granted:
            assert resp.status_code != 403, where
        else:
            assert resp.status_code == 403, where
    # the one destructive route last
    resp = caller.delete("/v1/adapters/tickets")
    assert resp.status_code == (204 if "train" in granted else 403)


def test_revoked_and_unknown_keys_are_401(app_client, world):
    key = key_for(app_client, world["owner"], ["predict"])
    caller = as_key(app_client, key["key"])
    assert caller.get("/v1/adapters").status_code == 200
    assert app_client.delete(f"/v1/keys/{key['id']}").status_code == 204
    anonymous = TestClient(app_client.app)  # no Authorization header at all
    for client in (caller, as_key(app_client, "ldk_not_a_key"), anonymous):
        resp = client.get("/v1/adapters")
        assert_problem(resp, 401)
        assert resp.headers["www-authenticate"].startswith("Bearer")
    assert_problem(app_client.delete(f"/v1/keys/{key['id']}"), 404)  # already revoked


def test_admin_keys_are_only_issued_in_the_operators_tenant(app_client, world):
    resp = app_client.post(f"/v1/tenants/{world['other']}/keys", json={"scopes": ["admin"]})
    assert_problem(resp, 422, "operator")
    ops = key_for(app_client, world["owner"], ["admin"])
    assert as_key(app_client, ops["key"]).get("/v1/tenants").status_code == 200
