"""The registry on PostgreSQL, and job claiming by several replicas sharing one registry.

Claiming and recovery tests run on both backends through the parametrized `db` fixture; what only
PostgreSQL promises (several replicas: exact per-tenant cap, leases, concurrent start-up) runs on
PostgreSQL only. Each replica is a JobRunner with its own Database (own engine and connections).
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import event, select, text, update

from loradock.service.db.models import Adapter, ApiKey, Job, Tenant, new_id
from loradock.service.db.registry import Database, head_revision, make_engine, normalize_url
from loradock.service.jobs import JobRunner
from tests.pg import create_database


def add_jobs(db: Database, per_tenant: dict[str, int]) -> list[str]:
    """Queued jobs, oldest first in the order given (tenant by tenant)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids: list[str] = []
    with db.session() as s:
        for tenant in per_tenant:
            s.add(Tenant(id=f"tn_{tenant}", name=tenant))
        s.flush()
        for tenant, n in per_tenant.items():
            for i in range(n):
                adapter = Adapter(
                    id=new_id("ad"), tenant_id=f"tn_{tenant}", name=f"{tenant}{i}", task="t"
                )
                s.add(adapter)
                s.flush()
                job = Job(
                    id=new_id("job"),
                    tenant_id=f"tn_{tenant}",
                    adapter_id=adapter.id,
                    version=1,
                    created_at=start + timedelta(seconds=len(ids)),
                )
                s.add(job)
                ids.append(job.id)
    return ids


def replica(url: str, name: str, **kw: object) -> JobRunner:
    """A JobRunner as another replica would have it: its own engine and worker id."""
    runner = JobRunner(Database(url), store=None, base=None, **kw)  # type: ignore[arg-type]
    runner.worker_id = name
    return runner


def jobs(db: Database) -> dict[str, Job]:
    with db.session() as s:
        return {j.id: j for j in s.scalars(select(Job)).all()}


# --- both backends -----------------------------------------------------------------------------


def test_claims_are_fair_across_tenants_and_capped_per_tenant(db):
    ids = add_jobs(db, {"busy": 3, "quiet": 1})
    busy, quiet = ids[:3], ids[3]
    runner = JobRunner(db, store=None, base=None, max_running_per_tenant=1)  # type: ignore[arg-type]
    assert runner._claim() == busy[0]  # the oldest job first
    assert runner._claim() == quiet  # busy is at its cap: the other tenant goes
    assert runner._claim() is None  # both at their cap of 1
    runner.max_running_per_tenant = 2
    assert runner._claim() == busy[1]
    assert runner._claim() is None
    rows = jobs(db)
    assert [rows[j].status for j in busy] == ["running", "running", "queued"]
    assert rows[busy[0]].attempts == 1
    assert rows[busy[0]].claimed_by == runner.worker_id
    assert rows[busy[0]].started_at is not None
    assert rows[busy[0]].started_at.tzinfo is not None


def test_concurrent_replicas_claim_every_job_exactly_once(db, db_url):
    ids = add_jobs(db, {"a": 12, "b": 12, "c": 12})
    runners = [replica(db_url, f"replica-{i}") for i in range(4)]
    claimed: dict[str, list[str]] = {r.worker_id: [] for r in runners}
    errors: list[BaseException] = []
    go = threading.Barrier(len(runners))

    def work(runner: JobRunner) -> None:
        try:
            go.wait()
            while (job_id := runner._claim()) is not None:
                claimed[runner.worker_id].append(job_id)
        except BaseException as e:  # surfaced below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in runners:
        r.db.close()
    assert errors == []
    counts = Counter(j for js in claimed.values() for j in js)
    assert sorted(counts) == sorted(ids)  # every job claimed...
    assert set(counts.values()) == {1}  # ...by exactly one replica
    rows = jobs(db)
    for worker, mine in claimed.items():
        for job_id in mine:
            assert rows[job_id].status == "running"
            assert rows[job_id].attempts == 1
            assert rows[job_id].claimed_by == worker


def test_recover_requeues_dead_jobs_and_fails_exhausted_ones(db):
    ids = add_jobs(db, {"a": 2})
    runner = JobRunner(db, store=None, base=None, max_attempts=2)  # type: ignore[arg-type]
    assert runner._claim() == ids[0]
    assert runner._claim() == ids[1]
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    with db.session() as s:  # the process died an hour ago; one job already ran twice
        s.execute(update(Job).values(heartbeat_at=long_ago))
        s.execute(update(Job).where(Job.id == ids[1]).values(attempts=2))
    assert runner.recover() == (1, 1)
    rows = jobs(db)
    assert (rows[ids[0]].status, rows[ids[0]].claimed_by) == ("queued", None)
    assert rows[ids[0]].progress["requeued"] is True
    assert rows[ids[1]].status == "failed"
    assert "max_attempts" in rows[ids[1]].error
    assert runner.recover() == (0, 0)


# --- PostgreSQL only: a registry shared by replicas ----------------------------------------------


@pytest.fixture
def pg_url(postgres_url):
    url = create_database(postgres_url)
    db = Database(url)
    db.upgrade()
    db.close()
    return url


@pytest.fixture
def pg(pg_url):
    db = Database(pg_url)
    yield db
    db.close()


def test_the_claim_query_locks_candidates_with_skip_locked(pg):
    runner = JobRunner(pg, store=None, base=None)  # type: ignore[arg-type]
    seen: list[str] = []

    def capture(conn, cursor, statement, *args):
        seen.append(statement)

    event.listen(pg.engine, "before_cursor_execute", capture)
    try:
        add_jobs(pg, {"a": 1})
        assert runner._claim() is not None
    finally:
        event.remove(pg.engine, "before_cursor_execute", capture)
    select_sql = next(s for s in seen if "FROM jobs" in s and s.lstrip().startswith("SELECT"))
    assert "FOR UPDATE OF jobs SKIP LOCKED" in select_sql


def test_a_row_locked_by_another_claimer_is_skipped_not_waited_for(pg, pg_url):
    ids = add_jobs(pg, {"a": 1, "b": 1})
    other = Database(pg_url)
    try:
        with other.session() as s:  # another replica is in the middle of claiming job 0
            s.execute(select(Job).where(Job.id == ids[0]).with_for_update())
            runner = JobRunner(pg, store=None, base=None)  # type: ignore[arg-type]
            assert runner._claim() == ids[1]  # at once, not after the other commits
            assert runner._claim() is None  # job 0 is still locked: skipped, not claimed
        assert runner._claim() == ids[0]
    finally:
        other.close()


def test_the_per_tenant_cap_holds_across_concurrent_replicas(pg, pg_url):
    add_jobs(pg, {"a": 6, "b": 6, "c": 6})
    runners = [replica(pg_url, f"r{i}", max_running_per_tenant=2) for i in range(6)]
    go = threading.Barrier(len(runners))
    errors: list[BaseException] = []

    def work(runner: JobRunner) -> None:
        try:
            go.wait()
            for _ in range(4):
                runner._claim()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in runners:
        r.db.close()
    assert errors == []
    running = Counter(j.tenant_id for j in jobs(pg).values() if j.status == "running")
    assert running == {"tn_a": 2, "tn_b": 2, "tn_c": 2}


def test_a_live_replicas_job_is_not_requeued_until_its_lease_expires(pg, pg_url):
    ids = add_jobs(pg, {"a": 1})
    owner = replica(pg_url, "owner", lease_seconds=0.6)
    other = replica(pg_url, "starting", lease_seconds=0.6)
    try:
        assert owner._claim() == ids[0]
        assert other.recover() == (0, 0)  # a replica starting up leaves it alone
        for _ in range(3):  # the owner keeps its lease while it runs the job
            threading.Event().wait(0.3)
            owner.heartbeat()
            assert other.recover() == (0, 0)
        threading.Event().wait(0.8)  # the owner died: no heartbeat for longer than the lease
        assert other.recover() == (1, 0)
        row = jobs(pg)[ids[0]]
        assert (row.status, row.claimed_by, row.attempts) == ("queued", None, 1)
        assert other._claim() == ids[0]
        assert jobs(pg)[ids[0]].attempts == 2
        owner.heartbeat()  # the old owner cannot renew a lease it lost
        assert jobs(pg)[ids[0]].claimed_by == "starting"
        # and if it finishes training after all, it drops its attempt instead of publishing
        assert owner._still_mine(ids[0]) is False
        assert other._still_mine(ids[0]) is True
    finally:
        owner.db.close()
        other.db.close()


def test_the_lease_thread_renews_and_sweeps(pg, pg_url):
    ids = add_jobs(pg, {"a": 2})
    dead = replica(pg_url, "dead", lease_seconds=0.6)
    alive = replica(pg_url, "alive", lease_seconds=0.6)
    try:
        assert dead._claim() == ids[0]
        assert alive._claim() == ids[1]
        lease = threading.Thread(target=alive._lease_loop, daemon=True)  # what start() runs
        lease.start()
        threading.Event().wait(1.5)  # 2.5 leases: "dead" never renews, "alive" every 0.1 s
        alive._stop.set()
        lease.join(5)
        rows = jobs(pg)
        assert rows[ids[1]].status == "running"  # renewed by its owner's heartbeat
        assert rows[ids[0]].status == "queued"  # the dead replica's job was swept
    finally:
        dead.db.close()
        alive.db.close()


def test_replicas_starting_together_migrate_and_bootstrap_once(postgres_url, tmp_path):
    url = create_database(postgres_url)
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(4)

    def start(i: int) -> None:
        db = Database(url)
        try:
            go.wait()
            assert db.upgrade() == head_revision()
            results[i] = db.bootstrap(tmp_path / f"replica-{i}" / "bootstrap-key")
        except BaseException as e:
            errors.append(e)
        finally:
            db.close()

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sum(r is not None for r in results.values()) == 1
    assert len(list(tmp_path.glob("replica-*/bootstrap-key"))) == 1
    db = Database(url)
    try:
        with db.session() as s:
            assert len(s.scalars(select(Tenant)).all()) == 1
            assert len(s.scalars(select(ApiKey)).all()) == 1
    finally:
        db.close()


def test_datetimes_are_utc_whatever_the_session_time_zone(pg):
    when = datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    with pg.session() as s:
        s.execute(text("SET TIME ZONE 'America/New_York'"))
        s.add(Tenant(id="tn_tz", name="tz", created_at=when))
    with pg.session() as s:
        s.execute(text("SET TIME ZONE 'Asia/Tokyo'"))
        got = s.get(Tenant, "tn_tz").created_at
        assert got == when
        assert got.utcoffset() == timedelta(0)
        stored = s.scalar(text("SELECT created_at AT TIME ZONE 'UTC' FROM tenants"))
        assert stored == datetime(2026, 3, 28, 20, 0)


def test_json_columns_round_trip(pg):
    ids = add_jobs(pg, {"a": 1})
    spec = {"nested": {"list": [1, 2.5, None, True]}, "text": 'naïve ✓ "quoted"'}
    with pg.session() as s:
        s.get(Job, ids[0]).spec = spec
    assert jobs(pg)[ids[0]].spec == spec


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p%40ss@db:5432/reg", "postgresql+psycopg://u:p%40ss@db:5432/reg"),
        ("postgresql://u@db/reg", "postgresql+psycopg://u@db/reg"),
        ("postgresql+psycopg://u@db/reg", "postgresql+psycopg://u@db/reg"),
        ("sqlite:////data/loradock.db", "sqlite:////data/loradock.db"),
    ],
)
def test_postgres_urls_without_a_driver_use_psycopg(given, expected):
    assert normalize_url(given) == expected


def test_a_driverless_url_reaches_the_server(postgres_url):
    url = postgres_url.replace("postgresql+psycopg://", "postgres://")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT 1")) == 1
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()


def test_a_delete_elsewhere_is_seen_within_the_ttl_and_frees_the_copy_here(db):
    from loradock.service.dataplane import LiveVersions
    from loradock.service.db.models import Version
    from loradock.service.errors import NotFound

    with db.session() as s:
        s.add(Tenant(id="tn_a", name="a"))
        s.flush()
        s.add(Adapter(id="ad_x", tenant_id="tn_a", name="x", task="t", live_version=1))
        s.flush()
        s.add(Version(adapter_id="ad_x", version=1, status="ready", artifact_key="tn_a/ad_x/v1"))
    gone: list[str] = []
    live = LiveVersions(db, ttl=0.3, on_gone=gone.append)
    assert live.resolve("tn_a", "x", None).adapter_id == "ad_x"
    with pytest.raises(NotFound):  # a missing version of an existing adapter frees nothing
        live.resolve("tn_a", "x", 7)
    assert gone == []
    with db.session() as s:  # another replica deletes it
        s.delete(s.get(Adapter, "ad_x"))
    assert live.resolve("tn_a", "x", None).version == 1  # cached: allowed within the ttl
    threading.Event().wait(0.35)
    with pytest.raises(NotFound):
        live.resolve("tn_a", "x", None)
    assert gone == ["ad_x"]
    with pytest.raises(NotFound):
        live.resolve("tn_a", "x", None)
    assert gone == ["ad_x"]  # freed once


def test_missing_server_binaries_fail_with_how_to_install(monkeypatch):
    import tests.pg

    monkeypatch.setattr(tests.pg.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(tests.pg.shutil, "which", lambda name: None)
    with pytest.raises(
        tests.pg.PostgresNotInstalled, match=r"\.ci/run.*apt-get install postgresql"
    ):
        tests.pg.find_bin_dir()
