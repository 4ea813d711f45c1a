import stat
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from loradock.service.db.models import Adapter, ApiKey, Base, Tenant, new_id
from loradock.service.db.registry import hash_key, head_revision

# `db` (tests/conftest.py) runs every test here on SQLite and on PostgreSQL.


def test_upgrade_reaches_head_and_is_idempotent(db):
    assert db.current_revision() == head_revision()
    assert db.upgrade() == head_revision()


def test_migrations_match_the_models(db):
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_bootstrap_creates_default_tenant_and_private_key(db, tmp_path):
    key_path = tmp_path / "secret" / "bootstrap-key"
    result = db.bootstrap(key_path)
    assert result is not None
    key = key_path.read_text().strip()
    assert key.startswith("ldk_")
    assert len(key) > 40
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    with db.session() as s:
        tenant = s.scalars(select(Tenant)).one()
        stored = s.scalars(select(ApiKey)).one()
        assert tenant.name == "default"
        assert stored.key_hash == hash_key(key)
        assert stored.scopes == ["admin"]
        assert key not in (stored.key_hash, stored.prefix)  # the secret itself is not stored


def test_bootstrap_runs_only_on_an_empty_registry(db, tmp_path):
    key_path = tmp_path / "bootstrap-key"
    db.bootstrap(key_path)
    first = key_path.read_text()
    assert db.bootstrap(key_path) is None
    assert key_path.read_text() == first
    with db.session() as s:
        assert len(s.scalars(select(Tenant)).all()) == 1


def test_datetimes_come_back_in_utc(db):
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with db.session() as s:
        s.add(Tenant(id="tn_x", name="x", created_at=when))
    with db.session() as s:
        assert s.get(Tenant, "tn_x").created_at == when
        assert s.get(Tenant, "tn_x").created_at.tzinfo is not None


def test_adapter_names_are_unique_per_tenant_only(db):
    with db.session() as s:
        s.add_all([Tenant(id="tn_a", name="a"), Tenant(id="tn_b", name="b")])
    with db.session() as s:
        s.add(Adapter(id=new_id("ad"), tenant_id="tn_a", name="routing", task="classification"))
        s.add(Adapter(id=new_id("ad"), tenant_id="tn_b", name="routing", task="classification"))
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(Adapter(id=new_id("ad"), tenant_id="tn_a", name="routing", task="regression"))


def test_foreign_keys_are_enforced(db):
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(Adapter(id=new_id("ad"), tenant_id="tn_missing", name="x", task="classification"))


def test_failed_transaction_rolls_back(db):
    def add_then_fail():
        with db.session() as s:
            s.add(Tenant(id="tn_r", name="r"))
            s.flush()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        add_then_fail()
    with db.session() as s:
        assert s.get(Tenant, "tn_r") is None


def test_bootstrap_with_the_operators_admin_key_writes_no_file(db, tmp_path):
    key_path = tmp_path / "bootstrap-key"
    given = "ops-provided-admin-key-0123456789"
    assert db.bootstrap(key_path, given) is not None
    assert not key_path.exists()  # the operator's secret never lands on the data volume
    with db.session() as s:
        assert s.scalars(select(ApiKey)).one().key_hash == hash_key(given)


def test_an_update_racing_a_delete_is_a_409_not_a_500(db):
    """A promote that loaded the adapter before a concurrent delete committed: SQLAlchemy's
    StaleDataError on flush becomes 409 with a message to read again (on SQLite and PostgreSQL)."""
    import json

    from starlette.requests import Request

    from loradock.service.errors import unexpected_error_response

    with db.session() as s:
        tenant = Tenant(id=new_id("tn"), name="t")
        s.add(tenant)
        s.flush()
        s.add(Adapter(id="ad_race", tenant_id=tenant.id, name="race", task="classification"))
    caught = None
    try:
        with db.session() as s:
            row = s.get(Adapter, "ad_race")
            with db.session() as other:  # the concurrent delete commits first
                other.delete(other.get(Adapter, "ad_race"))
            row.live_version = 2
    except Exception as e:
        caught = e
    assert type(caught).__name__ == "StaleDataError"
    scope = {"type": "http", "method": "POST", "path": "/v1/adapters/race/versions/2/promote",
             "headers": [], "query_string": b""}  # fmt: skip
    response = unexpected_error_response(Request(scope), caught)
    assert response.status_code == 409
    assert "concurrent request" in json.loads(response.body)["detail"]
