"""Training jobs: persisted in the registry, run by worker threads inside the server.

A job row is the source of truth. Workers claim queued jobs with a conditional UPDATE (only one
claimer wins, on SQLite and PostgreSQL alike; on PostgreSQL the candidates are also row-locked with
`FOR UPDATE SKIP LOCKED`, so replicas claiming at once take different jobs instead of colliding),
train, publish the artifact atomically, then record the outcome and promotion in one transaction.

Jobs left `running` by a dead process are re-queued, or failed once they have used up their
attempts. A SQLite registry belongs to one process, so everything `running` at start-up is dead.
A PostgreSQL registry is shared by replicas: there a running job is dead only when its lease ran
out, i.e. its owner has not written `heartbeat_at` for `lease_seconds`; every replica with workers
heartbeats its own jobs and sweeps for expired leases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, text, update

from loradock.adapters import tasks
from loradock.adapters.artifacts.files import build_files
from loradock.adapters.artifacts.store import (
    ArtifactExists,
    ArtifactStore,
    StoreError,
    artifact_key,
)
from loradock.adapters.core.base import BaseModel
from loradock.adapters.core.scheduling import PriorityGate
from loradock.adapters.serving.slots import AdapterRef
from loradock.adapters.training.data import Dataset, Example
from loradock.adapters.training.served import served_metrics
from loradock.adapters.training.trainer import (
    Hyperparameters,
    TrainCallbacks,
    TrainOutcome,
)
from loradock.service import batchjobs
from loradock.service.db.models import Adapter, Job, Version, utcnow
from loradock.service.db.registry import Database
from loradock.service.errors import describe_failure, job_failure_message, storage_problem
from loradock.service.metrics import Metrics

if TYPE_CHECKING:
    from loradock.adapters.serving.engine import Engine

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
# pg_try_advisory_xact_lock(class, key) namespace of the per-tenant claim locks.
_CLAIM_LOCK_CLASS = 0x10AD
DATASET_FILE = "dataset.json"
PROFILE_ROWS = 2000  # most rows a reference profile is computed on


def dataset_key(tenant_id: str, adapter_id: str, job_id: str) -> str:
    return f"{tenant_id}/{adapter_id}/datasets/{job_id}"


def encode_dataset(train: Dataset, validation: Dataset | None, validation_split: float) -> bytes:
    def rows(ds: Dataset) -> list[dict[str, Any]]:
        return [{"text": e.text, "label": e.label, "group": e.group} for e in ds.examples]

    return json.dumps(
        {
            "task": train.task.name,
            "labels": train.labels,
            "warnings": train.warnings,
            "training": rows(train),
            "validation": rows(validation) if validation is not None else None,
            "validation_split": validation_split,
        }
    ).encode()


def decode_dataset(raw: bytes) -> tuple[Dataset, list[Example] | None, float]:
    body = json.loads(raw)

    def examples(rows: list[dict[str, Any]]) -> list[Example]:
        return [
            Example(text=r["text"], label=_label(r["label"]), group=r.get("group")) for r in rows
        ]

    train = Dataset(
        task=tasks.get(body["task"]),
        examples=examples(body["training"]),
        labels=list(body["labels"]),
        warnings=list(body.get("warnings", [])),
    )
    val = examples(body["validation"]) if body.get("validation") is not None else None
    return train, val, float(body.get("validation_split", 0.2))


def _label(value: Any) -> str | float | tuple[str, ...]:
    """A stored label: JSON has no tuple, so a multi-label set comes back as a list."""
    return tuple(value) if isinstance(value, list) else value


def version_served(ver: Version) -> dict[str, Any]:
    """The validation metrics of what a version serves (`training.served` in reports)."""
    return served_metrics(ver.metrics, ver.baseline, (ver.report or {}).get("winner"))


class JobRunner:
    """Worker threads that train queued jobs. `wake()` after queueing one to start it at once."""

    def __init__(
        self,
        db: Database,
        store: ArtifactStore,
        base: BaseModel,
        *,
        workers: int = 1,
        max_attempts: int = 3,
        max_running_per_tenant: int = 1_000_000,
        gate: PriorityGate | None = None,
        metrics: Metrics | None = None,
        lease_seconds: float = 30.0,
        max_seconds: float = 0.0,
    ) -> None:
        self.metrics = metrics
        self.max_seconds = max_seconds  # a job's wall-clock budget (0 = none)
        self.db = db
        self.store = store
        self.base = base
        self.workers = workers
        self.max_attempts = max_attempts
        self.max_running_per_tenant = max_running_per_tenant
        self.gate = gate or PriorityGate()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # Shared registry (PostgreSQL): other replicas run jobs too, so "running" needs a lease.
        self.shared = db.dialect == "postgresql"
        self.lease_seconds = lease_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: list[threading.Thread | None] = [None] * workers  # by index, supervised
        self._cancel: set[str] = set()
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()
        # Supervision: workers survive any exception; a job whose end could not be written (the
        # registry's disk full, the database away) is kept here and written when it can be.
        self._unrecorded: dict[str, str] = {}  # job id -> error to record
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.restarts = 0
        self.engine: Engine | None = None  # set by the runtime: prediction jobs run on it

    # --- lifecycle -----------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """Jobs left `running` by a dead process: re-queue, or fail after max_attempts.

        SQLite (one process owns the registry): every running job, called once at start-up.
        PostgreSQL (replicas share it): only jobs whose lease expired (no heartbeat for
        `lease_seconds`); the rows are locked with SKIP LOCKED so concurrent sweeps of several
        replicas never handle one job twice. Returns (requeued, failed).
        """
        requeued = failed = 0
        query = select(Job).where(Job.status == "running").order_by(Job.id)
        if self.shared:
            expired = utcnow() - timedelta(seconds=self.lease_seconds)
            query = query.where(
                or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < expired)
            ).with_for_update(skip_locked=True)
        with self.db.session() as s:
            for job in s.scalars(query).all():
                if job.attempts >= self.max_attempts:
                    finish_failed(
                        s, job, f"interrupted {job.attempts} times (max_attempts reached)", None
                    )
                    failed += 1
                else:
                    job.status, job.claimed_by, job.heartbeat_at = "queued", None, None
                    job.progress = {**(job.progress or {}), "requeued": True}
                    requeued += 1
        if requeued or failed:
            log.info("recovered interrupted jobs: %d re-queued, %d failed", requeued, failed)
            self._wake.set()
        return requeued, failed

    def heartbeat(self) -> None:
        """Renew the lease of this process's running jobs (PostgreSQL; see `recover`)."""
        with self._lock:
            mine = sorted(self._running)
        if not mine:
            return
        with self.db.session() as s:
            renewed = s.execute(
                update(Job)
                .where(Job.id.in_(mine), Job.status == "running", Job.claimed_by == self.worker_id)
                .values(heartbeat_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]
        if renewed < len(mine):  # finished just now, deleted, or (stalled) taken over elsewhere
            log.debug("heartbeat renewed %d of %d running jobs", renewed, len(mine))

    def _lease_loop(self) -> None:
        """Heartbeat own jobs often; sweep for other replicas' expired leases less often."""
        beat = max(self.lease_seconds / 6, 0.05)
        sweep_every = max(self.lease_seconds / 3, beat)
        last_sweep = time.monotonic()
        while not self._stop.wait(beat):
            try:
                self.heartbeat()
                if time.monotonic() - last_sweep >= sweep_every:
                    last_sweep = time.monotonic()
                    self.recover()
            except Exception:  # the registry may be briefly unreachable: try again next beat
                log.warning("job lease upkeep failed; retrying", exc_info=True)

    def start(self) -> None:
        for i in range(self.workers):
            self._start_worker(i)
        if self.shared and self.workers > 0:
            t = threading.Thread(target=self._lease_loop, name="loradock-job-lease", daemon=True)
            t.start()
            self._threads.append(t)
        if self.workers > 0:
            t = threading.Thread(target=self._supervise, name="loradock-job-supervisor",
                                 daemon=True)  # fmt: skip
            t.start()
            self._threads.append(t)
        self._wake.set()

    def _start_worker(self, i: int) -> None:
        t = threading.Thread(target=self._loop, name=f"loradock-job-{i}", daemon=True)
        t.start()
        self._workers[i] = t
        self._threads.append(t)

    def _supervise(self, every: float = 1.0) -> None:
        """Restart a worker thread that died (the loop catches everything, so this is for what
        nothing can catch), and keep the metrics of the workers' health current."""
        while not self._stop.wait(every):
            for i, t in enumerate(self._workers):
                if t is not None and not t.is_alive() and not self._stop.is_set():
                    self.restarts += 1
                    self._note_error(f"job worker {i} died; restarted")
                    if self.metrics is not None:
                        self.metrics.job_worker_restarts.inc()
                    self._start_worker(i)
            if self.metrics is not None:
                self.metrics.job_workers_alive.set(self.alive_workers())

    def alive_workers(self) -> int:
        return sum(1 for t in self._workers if t is not None and t.is_alive())

    def health(self) -> dict[str, Any]:
        """What /readyz shows of the training workers."""
        recent = self.last_error_at is not None and time.monotonic() - self.last_error_at < 300
        with self._lock:
            unrecorded = len(self._unrecorded)
        return {
            "workers": self.workers,
            "alive": self.alive_workers(),
            "running": len(self.running),
            "restarts": self.restarts,
            "unrecorded_outcomes": unrecorded,
            "last_error": self.last_error if recent else None,
        }

    def _note_error(self, message: str) -> None:
        log.error("%s", message)
        self.last_error = message
        self.last_error_at = time.monotonic()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the workers; a running job is interrupted and re-queued for the next start."""
        self._stop.set()
        with self._lock:
            self._cancel.update(self._running)
        self._wake.set()
        for t in self._threads:
            t.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)

    @property
    def running(self) -> set[str]:
        with self._lock:
            return set(self._running)

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        """Claim and train jobs until stopped. Nothing ends this loop but `stop`: an error while
        claiming (the registry away) backs off and tries again; a job that crashes is failed
        with a message its tenant can act on; an outcome that cannot be written is kept and
        written as soon as the registry takes writes again."""
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self._record_pending()
                job_id = self._claim()
                backoff = 1.0
            except Exception as e:
                self._note_error(f"cannot claim training jobs: {describe_failure(e)}")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if job_id is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._run(job_id)
            except Exception as e:
                log.exception("job %s crashed", job_id)
                self._fail(job_id, job_failure_message(e))
            finally:
                with self._lock:
                    self._running.discard(job_id)
                    self._cancel.discard(job_id)
                self._drop_dataset(job_id)

    def _record_pending(self) -> None:
        """Write the outcomes that could not be written when their jobs ended."""
        with self._lock:
            pending = dict(self._unrecorded)
        for job_id, error in pending.items():
            self._fail(job_id, error)
            self._drop_dataset(job_id)

    def _drop_dataset(self, job_id: str) -> None:
        drop_dataset(self.db, self.store, job_id)

    def _claim(self) -> str | None:
        """Take the next queued job: fair across tenants, at most `max_running_per_tenant` each.

        Tenants already at their running limit wait; among the others the tenant whose last job
        started longest ago goes first (so a tenant with 100 queued jobs cannot starve one with 1),
        then the oldest job of that tenant. The conditional UPDATE makes a claim exclusive.

        On PostgreSQL several replicas claim at once: the candidate rows are locked with
        `FOR UPDATE SKIP LOCKED` (a replica skips the jobs another is claiming instead of waiting
        for them or claiming them twice), and a per-tenant transaction lock plus a fresh count of
        the tenant's running jobs keeps the cap exact across replicas too.
        """
        running = (
            select(Job.tenant_id, func.count().label("n"))
            .where(Job.status == "running")
            .group_by(Job.tenant_id)
            .subquery()
        )
        last_start = (
            select(Job.tenant_id, func.max(Job.started_at).label("at"))
            .group_by(Job.tenant_id)
            .subquery()
        )
        with self._claim_lock, self.db.session() as s:  # exact per-tenant counts in a replica
            candidates = s.execute(
                select(Job.id, Job.tenant_id)
                .outerjoin(running, running.c.tenant_id == Job.tenant_id)
                .outerjoin(last_start, last_start.c.tenant_id == Job.tenant_id)
                .where(
                    Job.status == "queued",
                    func.coalesce(running.c.n, 0) < self.max_running_per_tenant,
                )
                .order_by(
                    last_start.c.at.is_not(None),
                    last_start.c.at,
                    Job.created_at,
                    Job.id,
                )
                .limit(5)
                # Rendered on PostgreSQL only (SQLite has no row locks: one writer at a time).
                .with_for_update(of=Job, skip_locked=True)
            ).all()
            for job_id, tenant_id in candidates:
                if self.shared and not self._tenant_below_cap(s, tenant_id):
                    continue
                claimed = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == "queued")
                    .values(
                        status="running",
                        claimed_by=self.worker_id,
                        attempts=Job.attempts + 1,
                        started_at=utcnow(),
                        heartbeat_at=utcnow(),
                    )
                )
                if claimed.rowcount == 1:  # type: ignore[attr-defined]
                    with self._lock:
                        self._running.add(job_id)
                    return job_id
        return None

    def _tenant_below_cap(self, s: Any, tenant_id: str) -> bool:
        """Hold the tenant's claim lock (until commit) and recount its running jobs.

        Another replica claiming for the same tenant holds the lock: skip the tenant this round
        rather than wait. Holding it, a new statement sees every claim committed before.
        """
        locked = s.scalar(
            text("SELECT pg_try_advisory_xact_lock(:cls, hashtext(:tenant))"),
            {"cls": _CLAIM_LOCK_CLASS, "tenant": tenant_id},
        )
        if not locked:
            return False
        n = s.scalar(
            select(func.count()).where(Job.tenant_id == tenant_id, Job.status == "running")
        )
        return bool(n < self.max_running_per_tenant)

    def _run(self, job_id: str) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:  # its adapter was deleted since the claim
                return
            tenant_id, adapter_id, version = job.tenant_id, job.adapter_id, job.version
            spec = dict(job.spec)
            if job.cancel_requested:
                finish_cancelled(s, job)
                return
        if spec.get("kind") == batchjobs.KIND:
            self._run_batch(job_id, tenant_id, adapter_id, version)
            return
        try:
            raw = self.store.read(dataset_key(tenant_id, adapter_id, job_id), DATASET_FILE)
        except StoreError as e:
            self._fail(job_id, f"the training data cannot be read: {e}")
            return
        train, validation, split = decode_dataset(raw)
        hp = Hyperparameters.model_validate(spec.get("hyperparameters") or {})
        log.info(
            "job %s: training %s v%d on %d rows", job_id, adapter_id, version, len(train.examples)
        )

        progress = _ProgressWriter(self.db, job_id, self.metrics)
        started = time.perf_counter()
        over_budget = False

        def should_stop() -> bool:
            nonlocal over_budget
            if self.max_seconds and time.perf_counter() - started > self.max_seconds:
                over_budget = True
            return over_budget or self._cancelled(job_id, progress)

        callbacks = TrainCallbacks(on_event=progress.on_event, should_cancel=should_stop)
        try:
            outcome = train.task.trainer(self.base, self.gate).run(
                train, hp, validation=validation, validation_split=split, callbacks=callbacks
            )
        finally:
            progress.close()
        if outcome.status == "cancelled" and over_budget and not self._stop.is_set():
            outcome.status, outcome.stop_reason = "failed", "budget"
            outcome.error = (
                f"stopped after the compute budget of {self.max_seconds:g} s per job (setting "
                "LORADOCK_JOB_MAX_SECONDS); train on fewer rows or epochs, or ask the operator "
                "for a larger budget"
            )
        self._record(outcome, time.perf_counter() - started)

        if outcome.status == "cancelled" and self._stop.is_set():
            with self.db.session() as s:  # interrupted by shutdown: run it again next start
                job = s.get(Job, job_id)
                if job is not None:
                    job.status, job.claimed_by = "queued", None
            log.info("job %s: interrupted by shutdown, re-queued", job_id)
            return
        if outcome.status == "succeeded":
            # loradock.json records every hyperparameter used, defaults included
            used = {**spec, "hyperparameters": hp.model_dump()}
            self._publish(job_id, tenant_id, adapter_id, version, used, outcome)
        else:
            with self.db.session() as s:
                job = s.get(Job, job_id)
                if job is None:
                    pass  # deleted with its adapter while training: nothing left to record
                elif outcome.status == "cancelled":
                    finish_cancelled(s, job)
                else:
                    finish_failed(s, job, outcome.error or "training failed", outcome)

    def _run_batch(self, job_id: str, tenant_id: str, adapter_id: str, version: int) -> None:
        """A prediction job (service/batchjobs.py): every row through the pinned version, then
        the predictions file published at once."""
        try:
            raw = self.store.read(dataset_key(tenant_id, adapter_id, job_id), DATASET_FILE)
        except StoreError as e:
            self._fail(job_id, f"the batch inputs cannot be read: {e}")
            return
        batch = batchjobs.BatchInput.decode(raw)
        ref: AdapterRef | None = None
        with self.db.session() as s:
            ver = s.scalar(
                select(Version).where(Version.adapter_id == adapter_id, Version.version == version)
            )
            adapter = s.get(Adapter, adapter_id)
            if (
                ver is not None
                and adapter is not None
                and ver.status == "ready"
                and ver.artifact_key
            ):
                ref = AdapterRef(adapter_id, version, adapter.name, ver.artifact_key)
        if ref is None:
            self._fail(job_id, f"version {version} is no longer servable (deleted or retrained)")
            return
        engine = self.engine
        if engine is None:
            self._fail(job_id, "this server runs no serving engine, so it cannot predict")
            return
        log.info("job %s: predicting %d rows with %s v%d", job_id, len(batch.texts), adapter_id,
                 version)  # fmt: skip
        progress = _ProgressWriter(self.db, job_id, self.metrics)
        clock = batchjobs.Throughput()
        started = time.perf_counter()
        progress.set(rows=len(batch.texts), rows_done=0, rows_failed=len(batch.errors))
        limit = engine.base.max_length

        def run(texts: Sequence[str]) -> list[dict[str, Any]]:
            resident = engine.acquire(ref)
            try:
                rows = engine.run([resident] * len(texts), texts)
            finally:
                engine.release([resident])
            return [r.prediction(limit) for r in rows]

        def should_stop() -> bool:
            over = bool(self.max_seconds) and time.perf_counter() - started > self.max_seconds
            return over or self._stop.is_set() or self._cancelled(job_id, progress)

        try:
            results = batchjobs.predict_all(
                batch, run, should_stop=should_stop, between=self.gate.yield_to_serving,
                on_progress=lambda done, n: progress.set(
                    rows_done=done + len(batch.errors), rows_per_second=clock.rate(done)
                ),
            )  # fmt: skip
        except batchjobs.Stopped:
            progress.close()
            self._end_stopped_batch(job_id, started)
            return
        except BaseException:
            progress.close()
            raise
        progress.close()
        data = batchjobs.encode_results(batch, results)
        if not self._still_mine(job_id):
            return
        try:
            self.store.publish(batchjobs.batch_key(tenant_id, adapter_id, job_id),
                               {batchjobs.OUTPUT_FILE: data}, {"job_id": job_id})  # fmt: skip
        except ArtifactExists:
            pass  # an earlier attempt of this job published the same rows
        except StoreError as e:
            self._fail(job_id, f"the predictions cannot be stored: {storage_problem(e) or e}")
            return
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is not None:
                job.status, job.finished_at = "succeeded", utcnow()
                job.progress = {**(job.progress or {}), "rows_done": len(batch.texts),
                                "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
        if self.metrics is not None:
            self.metrics.jobs_finished.labels("succeeded").inc()
        log.info("job %s: %d predictions published", job_id, len(batch.texts))

    def _end_stopped_batch(self, job_id: str, started: float) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return
            if self._stop.is_set():  # shutdown: run it again next start
                job.status, job.claimed_by = "queued", None
                log.info("job %s: interrupted by shutdown, re-queued", job_id)
            elif self.max_seconds and time.perf_counter() - started > self.max_seconds:
                job.stop_reason = "budget"
                finish_failed(s, job, f"stopped after the compute budget of {self.max_seconds:g} "
                              "s per job (setting LORADOCK_JOB_MAX_SECONDS); split the batch",
                              None)  # fmt: skip
            else:
                finish_cancelled(s, job)

    def _record(self, outcome: TrainOutcome, seconds: float) -> None:
        if self.metrics is None or (outcome.status == "cancelled" and self._stop.is_set()):
            return  # a shutdown hands the job back: it has not ended
        self.metrics.jobs_finished.labels(outcome.status).inc()
        if outcome.stop_reason:
            self.metrics.stops.labels(outcome.stop_reason).inc()
        self.metrics.training_seconds.observe(seconds)

    def _fail(self, job_id: str, error: str, outcome: TrainOutcome | None = None) -> None:
        """Mark a running job failed (a job deleted with its adapter has nothing to mark).

        Never raises: when the registry cannot take the write (disk full, database away), the
        outcome is kept and written by the worker loop later, so the job never stays `running`
        for good and the worker lives on."""
        try:
            with self.db.session() as s:
                job = s.get(Job, job_id)
                if job is not None and job.status == "running":
                    finish_failed(s, job, error, outcome)
        except Exception as e:
            self._note_error(f"job {job_id}: its failure cannot be recorded yet: "
                             f"{describe_failure(e)}")  # fmt: skip
            with self._lock:
                self._unrecorded[job_id] = error
            return
        with self._lock:
            self._unrecorded.pop(job_id, None)

    def _owns(self, job: Job) -> bool:
        return job.status == "running" and job.claimed_by == self.worker_id

    def _still_mine(self, job_id: str) -> bool:
        """False when another replica took the job over (our lease ran out while we trained)."""
        with self.db.session() as s:
            job = s.get(Job, job_id)
            if job is not None and not self._owns(job):
                log.warning("job %s: lease lost to %s; dropping this attempt", job_id,
                            job.claimed_by)  # fmt: skip
                return False
        return True

    def _cancelled(self, job_id: str, progress: _ProgressWriter) -> bool:
        with self._lock:
            if job_id in self._cancel:
                return True
        return progress.cancel_requested()

    # --- outcomes ------------------------------------------------------------------------------

    def _publish(
        self,
        job_id: str,
        tenant_id: str,
        adapter_id: str,
        version: int,
        spec: dict[str, Any],
        outcome: TrainOutcome,
    ) -> None:
        assert outcome.head is not None or not outcome.task.has_head
        meta = {
            "winner": outcome.winner,
            "winner_reason": outcome.winner_reason,
            "adapter_id": adapter_id,
            "version": version,
            "hyperparameters": spec.get("hyperparameters") or {},
            "metrics": outcome.metrics,
            "baseline": {k: v for k, v in outcome.baseline.items() if k != "per_class"},
            "data": {
                "rows": outcome.report.get("rows"),
                "validation": outcome.report.get("validation"),
                "warnings": len(outcome.report.get("warnings") or []),
            },
        }
        oof = outcome.reference_outputs
        files = build_files(
            base=self.base,
            task=outcome.task,
            meta=meta,
            head=outcome.head,
            weights=outcome.weights,
            profile_texts=outcome.reference_texts[:PROFILE_ROWS],
            profile_outputs=oof[:PROFILE_ROWS] if oof is not None else None,
        )
        key = artifact_key(tenant_id, adapter_id, version)
        if not self._still_mine(job_id):
            return
        try:
            self.store.publish(key, files, {"job_id": job_id, "adapter_id": adapter_id})
        except ArtifactExists:
            # Published by an earlier attempt of this same job (a replica that lost its lease
            # finished after all): the version is that job's result, keep it. Anything else
            # under this key is a real conflict.
            try:
                owner = self.store.manifest(key).meta.get("job_id")
            except StoreError:
                owner = None
            if owner != job_id:
                self._fail(job_id, f"artifact {key} already exists from another job", outcome)
                return
        except StoreError as e:
            cause = storage_problem(e)
            self._fail(job_id, f"{cause}: the trained adapter could not be saved; submit the job "
                       "again later" if cause else f"could not publish the artifact: {e}",
                       outcome)  # fmt: skip
            return
        try:
            self._record_published(job_id, adapter_id, version, spec, outcome, key)
        except Exception:
            # Not recorded (the registry's disk full, the database away): the artifact must not
            # outlive the failed write as an orphan; the job's failure is recorded by the loop.
            with contextlib.suppress(Exception):
                self.store.delete(key)
            raise

    def _record_published(
        self,
        job_id: str,
        adapter_id: str,
        version: int,
        spec: dict[str, Any],
        outcome: TrainOutcome,
        key: str,
    ) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            ver = s.scalar(
                select(Version).where(Version.adapter_id == adapter_id, Version.version == version)
            )
            adapter = s.get(Adapter, adapter_id)
            if job is None or ver is None or adapter is None:
                # The adapter was deleted while training: the artifact must not outlive it.
                self.store.delete(key)
                return
            if not self._owns(job):
                # Re-queued (lease expired) or finished elsewhere meanwhile: the owner records it.
                log.warning("job %s: no longer ours (%s), not recording", job_id, job.status)
                return
            ver.status = "ready"
            ver.metrics = {**outcome.metrics, "winner": outcome.winner}
            ver.history = outcome.history
            ver.baseline = outcome.baseline
            # Warnings found when the data was uploaded stay, followed by the trainer's own.
            warnings = list((ver.report or {}).get("warnings", []))
            warnings += [w for w in outcome.report.get("warnings", []) if w not in warnings]
            ver.report = {
                **outcome.report,
                "warnings": warnings,
                "labels": outcome.labels,
                "winner": outcome.winner,
                "winner_reason": outcome.winner_reason,
            }
            ver.artifact_key = key
            ver.base_fingerprint = self.base.fingerprint
            job.status, job.stop_reason, job.finished_at = (
                "succeeded",
                outcome.stop_reason,
                utcnow(),
            )
            job.history = outcome.history
            self._maybe_promote(s, adapter, ver, spec.get("promote", "if_better"), outcome)
        log.info("job %s: %s v%d ready (%s)", job_id, adapter_id, version, outcome.winner_reason)

    def _maybe_promote(
        self, s: Any, adapter: Adapter, ver: Version, policy: str, outcome: TrainOutcome
    ) -> None:
        promote = False
        reason = ""
        if policy == "always":
            promote, reason = True, "promote=always"
        elif policy == "never":
            reason = "promote=never"
        elif adapter.live_version is None:
            promote, reason = True, "no live version yet"
        else:
            live = s.scalar(
                select(Version).where(
                    Version.adapter_id == adapter.id, Version.version == adapter.live_version
                )
            )
            live_metrics = version_served(live) if live is not None else {}
            if type(outcome.task).better(outcome.served_metrics(), live_metrics):
                promote, reason = True, f"beats live version {adapter.live_version} on validation"
            else:
                reason = f"does not beat live version {adapter.live_version} on validation"
        ver.report = {**(ver.report or {}), "promotion": {"promoted": promote, "reason": reason}}
        if promote:
            adapter.live_version = ver.version
            adapter.labels = outcome.labels
        adapter.status = "ready" if adapter.live_version is not None else adapter.status


def drop_dataset(db: Database, store: ArtifactStore, job_id: str) -> None:
    """A job's uploaded dataset is kept while the job may still run (a retry after a crash reads
    it again) and deleted once the job has ended, whatever the outcome. Never raises: what is
    left behind is deleted by the start-up sweep."""
    try:
        with db.session() as s:
            job = s.get(Job, job_id)
            if job is None or job.status not in TERMINAL:
                return
            key = dataset_key(job.tenant_id, job.adapter_id, job.id)
        store.delete(key)
    except Exception as e:
        log.warning("job %s: its dataset could not be deleted yet (%s); the start-up sweep will",
                    job_id, describe_failure(e))  # fmt: skip


def finish_failed(s: Any, job: Job, error: str, outcome: TrainOutcome | None) -> None:
    job.status, job.error, job.finished_at = "failed", error, utcnow()
    if outcome is not None:
        job.stop_reason = outcome.stop_reason
        job.history = outcome.history
    _close_version(s, job, "failed")


def finish_cancelled(s: Any, job: Job) -> None:
    job.status, job.stop_reason, job.finished_at = "cancelled", "cancelled", utcnow()
    _close_version(s, job, "cancelled")


def _close_version(s: Any, job: Job, status: str) -> None:
    if (job.spec or {}).get("kind") == batchjobs.KIND:
        return  # a prediction job only reads its version
    ver = s.scalar(
        select(Version).where(Version.adapter_id == job.adapter_id, Version.version == job.version)
    )
    if ver is not None:
        ver.status = status
        ver.metrics = {**(ver.metrics or {}), "stop_reason": job.stop_reason}
    adapter = s.get(Adapter, job.adapter_id)
    if adapter is not None and adapter.live_version is None:
        adapter.status = "failed"


class _ProgressWriter:
    """Writes job progress to the registry: every epoch at once, step progress at most 2x/second."""

    def __init__(
        self, db: Database, job_id: str, metrics: Metrics | None = None, interval: float = 0.5
    ) -> None:
        self.db = db
        self.job_id = job_id
        self.metrics = metrics
        self.interval = interval
        self.progress: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancel = False
        self._dirty = False

    def set(self, **values: Any) -> None:
        """Progress fields of a job that is no training run (a batch job's rows)."""
        self.progress.update(values)
        self._dirty = True
        if time.monotonic() - self._last_write >= self.interval:
            self.flush()

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        self._observe(kind, event)
        if kind == "progress":
            self.progress.update(
                {k: event[k] for k in ("epoch", "epochs", "step", "steps") if k in event}
            )
            self.progress["loss"] = event.get("loss")
            self._dirty = True
            if time.monotonic() - self._last_write >= self.interval:
                self.flush()
        elif kind in ("epoch", "evaluation"):
            # Every run's epochs, in order; the trainer tags each with its `fold` or `final_fit`.
            self.history.append({k: v for k, v in event.items() if k != "type"})
            self._dirty = True
            self.flush()
        elif kind == "baseline":
            self.progress["baseline"] = {
                k: v for k, v in event["baseline"].items() if k not in ("per_class", "per_group")
            }
            self._dirty = True
        elif kind == "fold":
            self.progress["fold"] = event["fold"]
            self.progress["folds"] = event["folds"]
            self._dirty = True
        elif kind == "final_fit":  # after the folds: every row, the chosen number of epochs
            self.progress.pop("fold", None)
            self.progress["final_fit"] = True
            self._dirty = True

    def _observe(self, kind: Any, event: dict[str, Any]) -> None:
        m = self.metrics
        if m is None:
            return
        if kind == "progress":
            m.training_steps.inc()
            if event.get("loss") is not None:
                m.training_loss.labels(self.job_id, "train").set(event["loss"])
        elif kind == "epoch":
            m.training_epochs.inc()
            if event.get("val_loss") is not None:
                m.training_loss.labels(self.job_id, "validation").set(event["val_loss"])

    def close(self) -> None:
        """Write what is pending and drop this job's per-job series."""
        self.flush()
        if self.metrics is not None:
            for split in ("train", "validation"):
                with contextlib.suppress(KeyError):
                    self.metrics.training_loss.remove(self.job_id, split)

    def flush(self) -> None:
        if not self._dirty:
            return
        with self.db.session() as s:
            s.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(
                    progress=dict(self.progress), history=list(self.history), heartbeat_at=utcnow()
                )
            )
        self._last_write = time.monotonic()
        self._dirty = False

    def cancel_requested(self) -> bool:
        """The cancel flag in the registry (set by any replica), checked at most once a second."""
        now = time.monotonic()
        if not self._cancel and now - self._last_cancel_check >= 1.0:
            self._last_cancel_check = now
            with self.db.session() as s:
                self._cancel = bool(
                    s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
                )
        return self._cancel
