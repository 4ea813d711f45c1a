"""Keys and tenants over their whole life (issue 13): list without secrets, whoami, rotate,
no revoking the last admin key, tenant delete leaving nothing behind; and the OIP model
readiness that loads the live artifact."""

import shutil

from fastapi.testclient import TestClient

from tests.service.test_app import assert_problem
from tests.service.test_predict_api import TEXTS, predict, trained
from tests.service.test_training_api import store_keys


def as_key(client, key):
    """Another caller of the same running app (no `with`: that would run the lifespan again)."""
    return TestClient(client.app, headers={"Authorization": f"Bearer {key}"})


def test_keys_are_listed_without_secrets_and_whoami_names_the_caller(app_client):
    me = app_client.get("/v1/whoami").json()
    assert me["tenant_name"] == "default"
    assert me["scopes"] == ["admin"]
    keys = app_client.get("/v1/keys").json()["keys"]
    assert [k["id"] for k in keys] == [me["key_id"]]  # the bootstrap key is listed
    assert "key" not in keys[0]
    assert keys[0]["prefix"] == app_client.admin_key[:12]
    assert app_client.admin_key not in app_client.get("/v1/keys").text


def test_the_last_admin_key_cannot_be_revoked_but_can_be_rotated(app_client):
    me = app_client.get("/v1/whoami").json()
    assert_problem(app_client.delete(f"/v1/keys/{me['key_id']}"), 409, "last active admin key")
    rotated = app_client.post(f"/v1/keys/{me['key_id']}/rotate")
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()
    assert new["scopes"] == ["admin"]
    assert_problem(app_client.get("/v1/whoami"), 401)  # the old key is revoked
    admin = as_key(app_client, new["key"])
    assert admin.get("/v1/whoami").json()["key_id"] == new["id"]
    listed = admin.get("/v1/keys", params={"include_revoked": True}).json()["keys"]
    assert {k["id"]: k["revoked_at"] is not None for k in listed} == {
        me["key_id"]: True, new["id"]: False}  # fmt: skip
    # with a second admin key, the first one may go
    second = admin.post(f"/v1/tenants/{me['tenant_id']}/keys", json={"scopes": ["admin"]})
    assert admin.delete(f"/v1/keys/{new['id']}").status_code == 204
    assert as_key(app_client, second.json()["key"]).get("/v1/whoami").status_code == 200


def test_deleting_a_tenant_leaves_nothing_behind(app_client):
    tenant = app_client.post("/v1/tenants", json={"name": "acme"}).json()
    key = app_client.post(f"/v1/tenants/{tenant['id']}/keys", json={"scopes": ["train"]}).json()
    acme = as_key(app_client, key["key"])
    trained(acme)
    assert acme.get("/v1/whoami").json()["tenant_name"] == "acme"
    trained(app_client, name="mine")
    mine = store_keys(app_client)
    assert any(k.startswith(tenant["id"]) for k in mine)
    own = app_client.get("/v1/whoami").json()["tenant_id"]
    assert_problem(app_client.delete(f"/v1/tenants/{own}"), 409, "operator's own tenant")
    assert app_client.delete(f"/v1/tenants/{tenant['id']}").status_code == 204
    assert not any(k.startswith(tenant["id"]) for k in store_keys(app_client))
    assert [t["name"] for t in app_client.get("/v1/tenants").json()["tenants"]] == ["default"]
    acme = as_key(app_client, key["key"])
    assert_problem(acme.get("/v1/adapters"), 401)  # its keys went with it
    assert predict(app_client, "mine", TEXTS).status_code == 200  # the others' serve on
    assert_problem(app_client.delete(f"/v1/tenants/{tenant['id']}"), 404)


def test_oip_model_ready_is_false_while_the_live_artifact_is_corrupt(app_client):
    adapter_id = trained(app_client)
    assert app_client.get("/v2/models/tickets/ready").json()["ready"] is True
    runtime = app_client.app.state.runtime
    runtime.serving.forget(adapter_id)  # not resident: readiness must read the store
    [key] = [k for k in store_keys(app_client) if k.endswith("/v1")]
    victim = next((runtime.settings.data_dir / "artifacts" / key).glob("*.safetensors"))
    victim.write_bytes(b"garbage")
    resp = app_client.get("/v2/models/tickets/ready")
    assert resp.status_code == 503
    assert resp.json()["ready"] is False
    assert "corrupt" in resp.json()["error"]
    shutil.rmtree(runtime.settings.data_dir / "artifacts" / key)
    assert app_client.get("/v2/models/tickets/ready").json()["ready"] is False
