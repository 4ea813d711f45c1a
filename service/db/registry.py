"""Database access: engine, schema migrations, sessions, and first-start bootstrap."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from loradock.service.db.models import ApiKey, Tenant, new_id

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
KEY_PREFIX = "ldk_"
SCOPES = ("admin", "train", "predict")
# PostgreSQL advisory lock ids for migrations and bootstrap, so replicas starting together do not
# race (both would migrate, or both would create tenant `default` and one would fail to start).
_MIGRATION_LOCK = 0x10AD0C
_BOOTSTRAP_LOCK = 0x10AD0D
# Driver-less PostgreSQL URLs (and the `postgres://` scheme many providers hand out) mean psycopg 3,
# the driver loradock depends on; SQLAlchemy would otherwise look for psycopg2 or reject them.
_PG_SCHEMES = ("postgres", "postgresql")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def normalize_url(url: str) -> str:
    """`postgres://` and `postgresql://` select psycopg 3 (`postgresql+psycopg://`)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    parsed = make_url(url)
    if parsed.drivername in _PG_SCHEMES:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine with the settings each backend needs for a multi-threaded server."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints, safe with WAL
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # PostgreSQL: timestamps are stored as timestamptz (absolute instants); UTCDateTime converts
    # what comes back to UTC whatever the server's or role's TimeZone setting is.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


@dataclass(frozen=True)
class BootstrapResult:
    tenant_id: str
    key_id: str
    key_path: Path


class Database:
    """The registry database: owns the engine and hands out sessions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def upgrade(self) -> str | None:
        """Bring the schema to the newest revision. Returns the revision now in place."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return self.current_revision()

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on any error."""
        with self._sessions.begin() as s:
            yield s

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()

    # --- bootstrap -----------------------------------------------------------------------------

    def bootstrap(self, key_path: Path, admin_key: str | None = None) -> BootstrapResult | None:
        """On an empty registry, create tenant `default` and an admin key written to `key_path`.

        The key file is created with mode 0600 before the key is committed, so a crash leaves
        either no tenant (bootstrap runs again) or a tenant whose key is on disk. The key itself is
        never logged. With `admin_key` (the operator's own secret) that key is used and no file is
        written. Returns None when the registry already has tenants. On PostgreSQL replicas may
        start together: a transaction lock makes exactly one of them bootstrap (and write the key
        file into its own data dir); the others find the tenant and return None.
        """
        with self.session() as s:
            if self.dialect == "postgresql":  # replicas starting at once: one bootstraps
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _BOOTSTRAP_LOCK})
            if s.scalar(select(Tenant.id).limit(1)) is not None:
                return None
            tenant = Tenant(id=new_id("tn"), name="default")
            key = admin_key or generate_key()
            api_key = ApiKey(
                id=new_id("key"),
                tenant_id=tenant.id,
                key_hash=hash_key(key),
                prefix=key[:12],
                scopes=["admin"],
            )
            s.add(tenant)
            s.flush()
            s.add(api_key)
            s.flush()
            if admin_key is None:
                write_secret(key_path, key)
        if admin_key is None:
            log.info(
                "bootstrap: created tenant 'default' and an admin key, written to %s", key_path
            )
        else:
            log.info(
                "bootstrap: created tenant 'default' with the admin key from LORADOCK_ADMIN_KEY"
            )
        return BootstrapResult(tenant_id=tenant.id, key_id=api_key.id, key_path=key_path)


def write_secret(path: Path, value: str) -> None:
    """Write `value` to `path` atomically with mode 0600, never readable by others, and never
    over an existing file: one already there (an earlier registry's key, kept only with
    LORADOCK_ALLOW_REBOOTSTRAP) is first renamed `<name>.<UTC time>.old`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (value + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if path.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        kept = path.with_name(f"{path.name}.{stamp}.old")
        os.rename(path, kept)
        log.warning("bootstrap: the earlier key file was kept as %s", kept.name)
    try:
        os.link(tmp, path)  # fails if a file appeared meanwhile: never overwrites
    finally:
        os.unlink(tmp)
