"""The process's long-lived parts (DB, store, base model, metrics) and its lifecycle state."""

from __future__ import annotations

import enum
import logging
import threading
import time

from sqlalchemy import text

from loradock.adapters.artifacts.store import ArtifactStore, open_store
from loradock.adapters.core.base import BaseModel
from loradock.adapters.core.device import configure_threads, dtype_name
from loradock.adapters.core.scheduling import PriorityGate
from loradock.adapters.serving.engine import Engine
from loradock.adapters.serving.slots import SlotPool
from loradock.service.dataplane import DataPlane
from loradock.service.datasets import DatasetWorker
from loradock.service.db.registry import Database
from loradock.service.errors import NotReady, describe_failure, registry_problem
from loradock.service.jobs import JobRunner
from loradock.service.metrics import Metrics, StateCollector
from loradock.service.monitor import Monitor
from loradock.service.ratelimit import TenantRateLimiter
from loradock.service.settings import Settings
from loradock.service.storage import registry_looks_lost, sweep_orphans

log = logging.getLogger(__name__)


class RegistryLost(RuntimeError):
    """An empty registry next to data of an earlier one: refused unless told otherwise."""


class Phase(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


class Runtime:
    """Owns what the app needs, built once by `start()` and torn down by `stop()`.

    Readiness is explicit: routes that need the model or the registry raise NotReady (503) until
    `start()` has opened the registry and store, loaded the base model and run a warm-up pass.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.metrics.max_adapter_series = settings.max_adapter_series
        self.monitor: Monitor | None = None
        self.rate_limiter = TenantRateLimiter(
            settings.predict_rate_per_tenant, settings.predict_burst
        )
        self.db: Database | None = None
        self.store: ArtifactStore | None = None
        self.base: BaseModel | None = None
        self.threads = 0  # torch intra-op threads, set at start
        self.jobs: JobRunner | None = None
        self.state_collector: StateCollector | None = None
        self._registry_problem: str | None = None
        self._registry_checked_at = float("-inf")
        self.engine: Engine | None = None
        self.serving: DataPlane | None = None  # set by the app once the event loop runs
        self.gate = PriorityGate()  # serving work holds it; training steps yield to it
        # Uploaded training data is parsed and validated in a child process (service/datasets).
        self.datasets = DatasetWorker(settings.dataset_workers)
        self.error: str | None = None
        self._phase = Phase.STARTING
        self._changed = threading.Condition()

    # --- state ---------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    def _set_phase(self, phase: Phase) -> None:
        with self._changed:
            self._phase = phase
            self.metrics.ready.set(1 if phase is Phase.READY else 0)
            self._changed.notify_all()

    def wait_until_settled(self, timeout: float | None = None) -> Phase:
        """Block until start-up finished (ready or failed) or `timeout` passed."""
        with self._changed:
            self._changed.wait_for(lambda: self._phase is not Phase.STARTING, timeout)
            return self._phase

    def require_ready(self) -> None:
        """Raise NotReady unless requests can be served.

        Draining still serves: /readyz fails so load balancers stop routing here, but requests
        that arrive meanwhile (or are in flight) complete normally.
        """
        if self._phase in (Phase.READY, Phase.DRAINING):
            return
        if self._phase is Phase.STOPPED:
            raise NotReady("the server is shutting down")
        if self._phase is Phase.FAILED:
            raise NotReady("the server failed to start; see its log", retry_after=None)
        raise NotReady("the server is starting: the base model is loading")

    def serve_targets(self) -> list[str]:
        assert self.base is not None
        return list(self.settings.serve_target_modules or self.base.default_target_modules())

    def require_serving(self) -> DataPlane:
        self.require_ready()
        if self.serving is None:
            raise NotReady("the inference engine is starting")
        return self.serving

    def begin_drain(self) -> None:
        """Fail readiness from now on; in-flight work continues."""
        if self._phase is Phase.READY or self._phase is Phase.STARTING:
            log.info("draining: readiness now fails, in-flight requests continue")
            self._set_phase(Phase.DRAINING)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the registry and store, load and warm the base model, then report ready."""
        try:
            s = self.settings
            self.datasets.start()
            s.data_dir.mkdir(parents=True, exist_ok=True)
            assert s.database_url is not None
            assert s.store_url is not None
            self.db = Database(s.database_url)
            revision = self.db.upgrade()
            log.info("registry %s at schema revision %s", self.db.dialect, revision)
            admin = s.admin_key.get_secret_value() if s.admin_key is not None else None
            self.store = open_store(s.store_url)
            lost = registry_looks_lost(self.db, self.store, s.bootstrap_key_path)
            if lost is not None:
                if not s.allow_rebootstrap:
                    raise RegistryLost(lost)
                log.warning("%s; starting a new registry (LORADOCK_ALLOW_REBOOTSTRAP)", lost)
            self.db.bootstrap(s.bootstrap_key_path, admin)
            # On a shared registry another replica may be between a publish and its commit.
            min_age = 600.0 if self.db.dialect == "postgresql" else 0.0
            try:
                sweep_orphans(self.db, self.store, min_age)
            except Exception as e:  # a sweep that fails must not keep the server down
                log.warning("start-up sweep of the store failed: %s", describe_failure(e))

            self.threads = configure_threads(s.threads)
            log.info("torch intra-op threads: %d", self.threads)
            t0 = time.perf_counter()
            resolved = s.resolved_base_model()
            base = BaseModel.load(
                resolved.path, device=s.device, dtype=s.dtype, max_length=s.max_seq_length,
                hf_id=resolved.hf_id,
            )  # fmt: skip
            base.warm_up()
            load_seconds = time.perf_counter() - t0
            self.base = base
            self._record_base(base, load_seconds)
            pool = SlotPool(
                base,
                self.serve_targets(),
                max_rank=s.max_lora_rank,
                capacity=s.max_resident_adapters,
                cpu_capacity=s.cpu_tier_adapters,
            )
            self.engine = Engine(
                base, pool, self.store, self.gate,
                on_load=self.metrics.adapter_load_seconds.observe,
            )  # fmt: skip
            self.engine.warm_up()
            self.monitor = Monitor(self.store, s, self.metrics)
            self.monitor.start()
            self.state_collector = StateCollector(
                pool, self.db, s.max_adapter_series, s.metrics_cache_seconds
            )
            self.metrics.registry.register(self.state_collector)
            self.jobs = JobRunner(
                self.db,
                self.store,
                base,
                workers=s.job_workers,
                max_attempts=s.job_max_attempts,
                max_running_per_tenant=s.max_running_jobs_per_tenant,
                max_seconds=s.job_max_seconds,
                gate=self.gate,
                metrics=self.metrics,
            )
            self.jobs.engine = self.engine  # prediction (batch) jobs run on the serving engine
            self.jobs.recover()
            self.jobs.start()
            log.info(
                "base model %s (%s, %d parameters) ready on %s/%s in %.2fs",
                base.path, base.model_type, base.parameter_count(), base.device,
                dtype_name(base.dtype), load_seconds,
            )  # fmt: skip
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("start-up failed")
            self._set_phase(Phase.FAILED)
            raise
        if self._phase is Phase.STARTING:
            self._set_phase(Phase.READY)

    def _record_base(self, base: BaseModel, load_seconds: float) -> None:
        m = self.metrics
        m.base_model_load_seconds.set(load_seconds)
        m.base_model_parameters.set(base.parameter_count())
        m.base_model_bytes.set(base.parameter_bytes())
        m.base_model_info.info(
            {
                "model_type": base.model_type,
                "name": base.name,
                "device": str(base.device),
                "dtype": dtype_name(base.dtype),
                "fingerprint": base.fingerprint,
                "threads": str(self.threads),
            }
        )

    def check_registry(self, ttl: float = 1.0) -> str | None:
        """None when the registry answers a read of its tables, else what is wrong (cached
        `ttl` seconds: readiness probes must stay cheap)."""
        now = time.monotonic()
        if now - self._registry_checked_at < ttl:
            return self._registry_problem
        problem: str | None = None
        if self.db is None:
            problem = "the registry is not open"
        else:
            try:
                with self.db.session() as s:
                    s.execute(text("SELECT 1 FROM tenants LIMIT 1")).all()
            except Exception as e:
                problem = registry_problem(e) or describe_failure(e)
                log.error("registry check failed: %s", problem)
        self._registry_problem, self._registry_checked_at = problem, now
        return problem

    def stop(self) -> None:
        if self._phase is not Phase.FAILED:
            self._set_phase(Phase.STOPPED)
        if self.jobs is not None:
            self.jobs.stop(timeout=self.settings.shutdown_grace_seconds)
        if self.monitor is not None:
            self.monitor.stop()
        self.datasets.close()
        if self.db is not None:
            self.db.close()
        log.info("stopped")
