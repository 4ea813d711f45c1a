"""A throwaway PostgreSQL server for tests: initdb in a temp dir, loopback only, trust auth.

The server binaries come from the distribution's package (Debian: `apt-get install postgresql`,
which .ci/run does); no server is started by the package or by CI, only by these tests. PostgreSQL
refuses to run as root, so as root the cluster belongs to the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.server import free_port

SUPERUSER = "postgres"
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found under /usr/lib/postgresql/*/bin "
    "or on PATH. Run .ci/run (it installs them), or `sudo apt-get install postgresql`."
)


class PostgresNotInstalled(RuntimeError):
    pass


def find_bin_dir() -> Path:
    """The newest installed server's bin directory (Debian layout first, then PATH)."""

    def major(p: str) -> int:
        try:
            return int(Path(p).parent.parent.name)
        except ValueError:
            return 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=major)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    raise PostgresNotInstalled(INSTALL_HINT)


class PostgresCluster:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; `stop()` removes everything."""

    def __init__(self) -> None:
        self.bin = find_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="loradock-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.port = 0
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:  # the server refuses to run as root: the package's user runs it
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise PostgresNotInstalled(
                    "running as root, PostgreSQL needs the `postgres` user to run the server as; "
                    + INSTALL_HINT
                ) from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the maintenance database `postgres`."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root, check=False
        )

    def start(self) -> PostgresCluster:
        init = self._run(
            str(self.bin / "initdb"),
            "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        for _attempt in range(3):  # another process may take the free port before we bind it
            self.port = free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-c port={self.port}",
                    f"-c unix_socket_directories={self.root}",
                    "-c max_connections=200",
                    "-c fsync=off",  # a throwaway cluster: durability only costs time
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                ]
            )
            started = self._run(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile),
                "-o", options, "-w", "-t", "60", "start",
            )  # fmt: skip
            if started.returncode == 0:
                return self
        raise RuntimeError(f"PostgreSQL did not start:\n{started.stderr}\n{self.log()}")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        return create_database(self.url, name)

    def stop(self) -> None:
        if self.port and self.data.exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_database(server_url: str, name: str | None = None) -> str:
    """A new empty database on the server of `server_url`; returns the new database's URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = name or f"t_{uuid.uuid4().hex[:16]}"
    dsn = f"host={url.host} port={url.port} user={url.username} dbname={url.database}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    return url.set(database=name).render_as_string(hide_password=False)
