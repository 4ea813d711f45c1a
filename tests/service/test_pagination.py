"""Cursor pagination of the adapter and job lists, on SQLite and PostgreSQL, and over HTTP."""

from __future__ import annotations

from datetime import timedelta

import pytest

from loradock.service.api.adapters import adapter_page
from loradock.service.api.deps import Principal
from loradock.service.api.jobs import list_jobs
from loradock.service.db.models import Adapter, Job, Tenant, Version, new_id, utcnow
from loradock.service.errors import BadRequest
from tests.service.test_app import assert_problem


def fill(db, tenant: str, adapters: int) -> list[str]:
    """`adapters` adapters (two versions each, the second live) and one job each; some share a
    creation time, so the id breaks ties. Returns adapter ids in creation order."""
    start = utcnow()
    ids = []
    with db.session() as s:
        s.add(Tenant(id=tenant, name=tenant))
        s.flush()
        for i in range(adapters):
            at = start + timedelta(seconds=i // 3)  # three adapters per timestamp
            a = Adapter(
                id=new_id("ad"), tenant_id=tenant, name=f"a{i:03d}", task="classification",
                labels=["x", "y"], live_version=2, status="ready", created_at=at,
            )  # fmt: skip
            s.add(a)
            s.flush()
            for v in (1, 2):
                s.add(Version(
                    adapter_id=a.id, version=v, status="ready", created_at=at,
                    metrics={"val_macro_f1": 0.5 + v / 10}, history=[{"epoch": 1}] * 5,
                ))  # fmt: skip
            s.add(Job(
                id=new_id("job"), tenant_id=tenant, adapter_id=a.id, version=2,
                status="succeeded", history=[{"epoch": 1}] * 5, created_at=at,
            ))  # fmt: skip
            ids.append(a.id)
    return sorted(ids, key=lambda i: (ids.index(i) // 3, i))


def principal(tenant: str) -> Principal:
    return Principal(tenant_id=tenant, key_id="k", scopes=frozenset({"predict"}))


def test_adapters_page_in_order_without_gaps_or_repeats(db):
    expected = fill(db, "tn_a", 25)
    fill(db, "tn_b", 4)  # another tenant's adapters never appear
    seen, cursor, pages = [], None, 0
    while True:
        page = adapter_page(db, "tn_a", limit=4, cursor=cursor, view="full")
        pages += 1
        assert len(page.adapters) <= 4
        seen += [a.id for a in page.adapters]
        assert all(len(a.versions) == 2 for a in page.adapters)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == expected
    assert pages == 7  # 6 full pages and one of 1
    whole = adapter_page(db, "tn_a", limit=1000, cursor=None, view="full")
    assert [a.id for a in whole.adapters] == expected
    assert whole.next_cursor is None


def test_summary_view_leaves_out_versions(db):
    fill(db, "tn_a", 3)
    page = adapter_page(db, "tn_a", limit=2, cursor=None, view="summary")
    first = page.adapters[0].model_dump()
    assert "versions" not in first
    assert first["version_count"] == 2
    assert first["latest_version"] == 2
    assert first["live_metrics"] == {"val_macro_f1": pytest.approx(0.7)}
    assert page.next_cursor is not None


def test_jobs_page_newest_first(db):
    fill(db, "tn_a", 10)
    with db.session() as s:
        everything = s.query(Job).filter(Job.tenant_id == "tn_a").all()
        expected = [
            j.id for j in sorted(everything, key=lambda j: (-j.created_at.timestamp(), j.id))
        ]
    seen, cursor = [], None
    while True:
        page = list_jobs(db, adapter=None, limit=3, cursor=cursor, view="summary",
                         principal=principal("tn_a"))  # fmt: skip
        assert all("history" not in j.model_dump() for j in page.jobs)
        seen += [j.id for j in page.jobs]
        if (cursor := page.next_cursor) is None:
            break
    assert seen == expected


def test_a_cursor_of_another_list_or_edited_is_refused(db):
    fill(db, "tn_a", 5)
    page = adapter_page(db, "tn_a", limit=2, cursor=None, view="full")
    for bad in ("not-a-cursor", page.next_cursor[:-3], "e30"):
        with pytest.raises(BadRequest, match="not a cursor of this list"):
            adapter_page(db, "tn_a", limit=2, cursor=bad, view="full")
    with pytest.raises(BadRequest):
        list_jobs(db, adapter=None, limit=2, cursor=page.next_cursor, view="full",
                  principal=principal("tn_a"))  # fmt: skip


def test_pages_over_http(app_client):
    runtime = app_client.app.state.runtime
    tenant_id = app_client.get("/v1/whoami").json()["tenant_id"]
    start = utcnow()
    with runtime.db.session() as s:
        for i in range(5):  # distinct creation times: the order is the names' order
            at = start + timedelta(seconds=i)
            s.add(Adapter(id=new_id("ad"), tenant_id=tenant_id, name=f"h{i}", task="classification",
                          labels=["x"], status="failed", created_at=at))  # fmt: skip
    r = app_client.get("/v1/adapters", params={"limit": 2, "view": "summary"})
    assert r.status_code == 200
    body = r.json()
    assert [a["name"] for a in body["adapters"]] == ["h0", "h1"]
    r2 = app_client.get("/v1/adapters", params={"limit": 2, "cursor": body["next_cursor"]})
    assert [a["name"] for a in r2.json()["adapters"]] == ["h2", "h3"]
    assert_problem(app_client.get("/v1/adapters", params={"cursor": "zz"}), 400)
    assert_problem(app_client.get("/v1/adapters", params={"limit": 0}), 422)
    assert_problem(app_client.get("/v1/jobs", params={"view": "tiny"}), 422)
    # Search: a substring of the name, case-insensitive; LIKE's wildcards are literal.
    found = app_client.get("/v1/adapters", params={"q": "H3", "view": "summary"}).json()
    assert [a["name"] for a in found["adapters"]] == ["h3"]
    assert found["adapters"][0]["drifting"] is False
    assert app_client.get("/v1/adapters", params={"q": "h_"}).json()["adapters"] == []
    assert app_client.get("/v1/adapters", params={"q": "%"}).json()["adapters"] == []
