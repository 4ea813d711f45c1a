"""Key and tenant lifecycle through the Python client against a real server (tiny base)."""

import pytest
from loradock_client import AuthenticationError, Client, Conflict, NotFound

from tests.server import ServerProcess

pytestmark = pytest.mark.integration


def test_whoami_list_rotate_and_tenant_delete(tmp_path, tiny_bert_dir):
    with ServerProcess(tmp_path / "data", base_model=tiny_bert_dir) as server:
        with Client(server.url, server.admin_key) as c:
            me = c.keys.whoami()
            assert me.tenant_name == "default"
            assert [k.id for k in c.keys.list()] == [me.key_id]
            with pytest.raises(Conflict, match="last active admin key"):
                c.keys.revoke(me.key_id)
            acme = c.tenants.create("acme")
            worker = c.keys.create(acme.id, ["predict"])
            rotated = c.keys.rotate(me.key_id)
            assert rotated.key is not None
        with Client(server.url, server.admin_key) as old, pytest.raises(AuthenticationError):
            old.keys.whoami()
        with Client(server.url, rotated.key) as c:
            assert c.keys.whoami().key_id == rotated.id
            assert [k.id for k in c.keys.list(acme.id)] == [worker.id]
            c.tenants.delete(acme.id)
            assert [t.name for t in c.tenants.list()] == ["default"]
            with pytest.raises(NotFound):
                c.tenants.delete(acme.id)
        with Client(server.url, worker.key) as gone, pytest.raises(AuthenticationError):
            gone.keys.whoami()
