"""Run `loradock serve` with a SIGKILL armed at one chosen point (the kill -9 tests use this).

    python -m tests.crashpoint POINT serve

POINT is one of:
- `write:<file>`: while the store writes `<file>` of an adapter version (half of it is on disk),
- `rename`: after a version is complete in staging (manifest included), before it is published,
- `promote:before-commit`: after the UPDATE that changes a live version, before its commit,
- `promote:after-commit`: right after that commit, before the HTTP answer.

Nothing here changes what the server does until the point is reached: the hooks wrap the real store
functions and listen to real SQLAlchemy events, then the process kills itself with SIGKILL (no
cleanup, no atexit, no flush), exactly as `kill -9` from outside would at that moment.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from loradock.adapters.artifacts import store


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _is_version_staging(path: Path) -> bool:
    return path.parent.name == ".staging" or path.parent.parent.name == ".staging"


def arm_write(filename: str) -> None:
    real = store._write_durable

    def write(path: Path, data: bytes) -> None:
        if path.name == filename and _is_version_staging(path):
            real(path, data[: len(data) // 2])
            die()
        real(path, data)

    store._write_durable = write  # type: ignore[assignment]


def arm_rename() -> None:
    real = os.rename

    def rename(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
        if _is_version_staging(Path(src)) and "datasets" not in str(dst):
            die()
        real(src, dst, *args, **kw)

    store.os.rename = rename  # type: ignore[assignment]


def arm_promote(after_commit: bool) -> None:
    local = threading.local()

    @event.listens_for(Engine, "after_cursor_execute")
    def executed(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sql = " ".join(statement.split()).lower()
        if sql.startswith("update adapters") and "live_version" in sql:
            if not after_commit:
                die()
            local.promoted = True

    @event.listens_for(Session, "after_commit")
    def committed(session: Session) -> None:
        if getattr(local, "promoted", False):
            die()


def main(argv: list[str]) -> int:
    point, rest = argv[0], argv[1:]
    if point.startswith("write:"):
        arm_write(point.removeprefix("write:"))
    elif point == "rename":
        arm_rename()
    elif point in ("promote:before-commit", "promote:after-commit"):
        arm_promote(after_commit=point.endswith("after-commit"))
    else:
        raise SystemExit(f"unknown crash point {point!r}")
    from loradock.service.cli import main as serve_main

    return serve_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
