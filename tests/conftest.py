from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from loradock.service.db.registry import Database
from loradock.service.metrics import Metrics
from loradock.service.settings import Settings
from tests.pg import PostgresCluster, PostgresNotInstalled, create_database
from tests.tiny_models import build_tiny_bert, build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (pyproject's addopts run two workers), each worker and every server it starts
# gets its share of the cores: two torch processes that each use every core slow each other down
# many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(
        1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@contextmanager
def _run_lock(config: pytest.Config, exclusive: bool) -> Iterator[None]:
    """A readers-writer lock across xdist workers: a test marked `exclusive` runs alone, the others
    side by side. A turnstile lock keeps a waiting exclusive test from being starved."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:  # not under xdist: nothing runs beside us
        yield
        return
    stem = os.path.join(tempfile.gettempdir(), f"loradock-tests-{workerinput['testrunuid']}")
    with ExitStack() as stack:
        turnstile = stack.enter_context(open(stem + ".turnstile", "a"))
        main = stack.enter_context(open(stem + ".lock", "a"))
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if exclusive:
            fcntl.flock(main, fcntl.LOCK_EX)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        else:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            fcntl.flock(main, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(main, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    exclusive = item.get_closest_marker("exclusive") is not None
    with _run_lock(item.config, exclusive):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    # `bench/gpu.sh --dry-run` (LORADOCK_TEST_DEVICE=cpu) runs the GPU tests that take their
    # device from that variable, `gpu(dry_run=True)`, on the CPU to show they would run.
    dry_run = os.environ.get("LORADOCK_TEST_DEVICE") == "cpu"
    skip = pytest.mark.skip(reason="needs CUDA; this machine has no GPU")
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None and not (dry_run and marker.kwargs.get("dry_run")):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def settings(tmp_path: Path, tiny_bert_dir: Path) -> Settings:
    """Settings for an in-process app on the tiny BERT, with its own data dir. Uploads are
    parsed in the thread pool (dataset_workers=0) to spare each test a process start; the
    child-process path is tested in tests/service/test_datasets.py and by every real server."""
    return Settings(data_dir=tmp_path / "data", base_model=tiny_bert_dir, dataset_workers=0)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()  # a fresh registry per test


@contextmanager
def started_client(settings: Settings, metrics: Metrics) -> Iterator[Any]:
    """A TestClient on a started app (lifespan run, base model loaded), with the admin key."""
    from fastapi.testclient import TestClient

    from loradock.service.app import create_app
    from loradock.service.runtime import Phase

    app = create_app(settings, metrics=metrics)
    with TestClient(app) as client:
        assert app.state.runtime.wait_until_settled(60) is Phase.READY, app.state.runtime.error
        client.admin_key = (settings.data_dir / "bootstrap-key").read_text().strip()  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {client.admin_key}"  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def app_client(settings: Settings, metrics: Metrics) -> Iterator[object]:
    """A TestClient on a started app (lifespan run, base model loaded)."""
    with started_client(settings, metrics) as client:
        yield client


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on loopback for the session: URL of its `postgres` database.

    Tests create their own database on it with `tests.pg.create_database(postgres_url)`. Missing
    server binaries fail the test (CI installs them): a multi-replica feature is not skipped.
    """
    missing = None
    try:
        cluster = PostgresCluster()
    except PostgresNotInstalled as e:
        missing = str(e)
    if missing is not None:
        pytest.fail(missing, pytrace=False)
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty registry database on each backend: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return create_database(request.getfixturevalue("postgres_url"))


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated registry on each backend (parametrized: sqlite, postgresql)."""
    database = Database(db_url)
    database.upgrade()
    yield database
    database.close()
