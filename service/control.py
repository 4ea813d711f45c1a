"""The control plane: create, retrain, promote, delete and import adapters, once for every route.

Each operation takes a tenant id and plain inputs, does its database, dataset and store work
synchronously (routes call it from the thread pool, never on the event loop), and raises the
typed errors of `service.errors`. Routes only translate HTTP to and from it. Promotion is written
once here (`promote`) for the promote route; the training job's automatic promotion lives with
the job (`service.jobs`) because it commits together with the job's outcome.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loradock.adapters import tasks
from loradock.adapters.artifacts.files import META
from loradock.adapters.artifacts.importing import (
    ImportRejected,
    ImportTooLarge,
    read_zip,
    validate_import,
)
from loradock.adapters.artifacts.store import artifact_key
from loradock.adapters.training.data import (
    Dataset,
    DatasetError,
    check_split_feasible,
    check_validation_labels,
    remove_leakage,
    validate_rows,
)
from loradock.adapters.training.hyperparameters import Hyperparameters
from loradock.service.db.models import Adapter, Job, Version, new_id, utcnow
from loradock.service.errors import Conflict, PayloadTooLarge, TooManyRequests, Unprocessable
from loradock.service.jobs import DATASET_FILE, dataset_key, encode_dataset
from loradock.service.lookup import find_adapter, find_version
from loradock.service.runtime import Runtime

ACTIVE_JOB = ("queued", "running")


@dataclass(frozen=True)
class TrainRequest:
    """What a new version is trained from (already parsed; rows not yet validated)."""

    training_data: Sequence[Mapping[str, Any]]
    validation_data: Sequence[Mapping[str, Any]] | None = None
    validation_split: float = 0.2
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    promote: str = "if_better"


@dataclass(frozen=True)
class Queued:
    adapter_id: str
    job_id: str


def dataset_problem(e: DatasetError) -> Unprocessable:
    return Unprocessable(str(e), extra={"errors": [p.as_dict() for p in e.problems]})


class Control:
    """Adapter lifecycle operations on one Runtime (its registry, store, jobs and data plane)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def db(self) -> Any:
        assert self.runtime.db is not None
        return self.runtime.db

    @property
    def store(self) -> Any:
        assert self.runtime.store is not None
        return self.runtime.store

    # --- training ------------------------------------------------------------------------------

    def create(self, tenant_id: str, name: str, task: str, req: TrainRequest) -> Queued:
        """A new adapter whose version 1 trains from `req` (queued; 202 semantics)."""
        try:
            task_cls = tasks.get(task)
        except tasks.UnknownTask as e:
            raise Unprocessable(f"task: {e}") from e
        train, val = self._datasets(task_cls, req)
        try:
            with self.db.session() as s:
                self._check_new_adapter(s, tenant_id, name)
                adapter = Adapter(
                    id=new_id("ad"), tenant_id=tenant_id, name=name, task=task_cls.name,
                    labels=train.labels, status="training", created_at=utcnow(),
                    updated_at=utcnow(),
                )  # fmt: skip
                s.add(adapter)
                s.flush()
                job = self._queue(s, tenant_id, adapter, 1, req, train, val)
                queued = Queued(adapter.id, job.id)
        except IntegrityError as e:
            raise Conflict(f"an adapter named {name!r} already exists") from e
        self._wake()
        return queued

    def retrain(self, tenant_id: str, adapter: str, req: TrainRequest) -> Queued:
        """A new version of an existing adapter (one training job per adapter at a time)."""
        with self.db.session() as s:
            task = tasks.get(find_adapter(s, tenant_id, adapter).task)
        train, val = self._datasets(task, req)
        try:
            with self.db.session() as s:
                row = find_adapter(s, tenant_id, adapter)
                busy = s.scalar(
                    select(Job.id).where(Job.adapter_id == row.id, Job.status.in_(ACTIVE_JOB))
                )
                if busy:
                    raise Conflict(
                        f"adapter {row.name!r} is already training (job {busy}); wait or cancel it"
                    )
                latest = s.scalar(
                    select(func.max(Version.version)).where(Version.adapter_id == row.id)
                )
                job = self._queue(s, tenant_id, row, (latest or 0) + 1, req, train, val)
                queued = Queued(row.id, job.id)
        except IntegrityError as e:
            raise Conflict("another version was created at the same time; retry") from e
        self._wake()
        return queued

    # --- lifecycle -----------------------------------------------------------------------------

    def promote(self, tenant_id: str, adapter: str, version: int) -> str:
        """Make `version` live (also how to roll back). In-flight requests finish on the old
        one; every request after the commit resolves to the new one. Returns the adapter id."""
        with self.db.session() as s:
            row = find_adapter(s, tenant_id, adapter)
            ver = find_version(s, row, version)
            if ver.status != "ready":
                raise Conflict(
                    f"version {version} is {ver.status}, only a ready version can be live"
                )
            row.live_version = ver.version
            row.labels = (ver.report or {}).get("labels", row.labels)
            row.status = "ready"
            row.updated_at = utcnow()
            adapter_id = row.id
        if self.runtime.serving is not None:
            self.runtime.serving.live.invalidate(adapter_id)
        return adapter_id

    def delete(self, tenant_id: str, adapter: str) -> None:
        """The adapter, its versions, jobs, feedback, artifacts and serving state, everywhere."""
        with self.db.session() as s:
            row = find_adapter(s, tenant_id, adapter)
            adapter_id = row.id
            active = s.scalars(
                select(Job.id).where(Job.adapter_id == adapter_id, Job.status.in_(ACTIVE_JOB))
            ).all()
            s.delete(row)  # versions, jobs and feedback go with it (ON DELETE CASCADE)
        if self.runtime.jobs is not None:
            for job_id in active:
                self.runtime.jobs.cancel(job_id)
        if self.runtime.serving is not None:  # stops at once; slots free after in-flight use
            self.runtime.serving.forget(adapter_id)
        elif self.runtime.monitor is not None:
            self.runtime.monitor.forget(adapter_id)
        self.store.delete_prefix(f"{tenant_id}/{adapter_id}")

    def import_version(self, tenant_id: str, name: str, data: bytes) -> str:
        """A new adapter whose live version 1 is a verified zip (as GET .../download gives it).
        Nothing is stored before every check passed. Returns the adapter id."""
        plane = self.runtime.require_serving()
        base = plane.engine.base
        cap = self.runtime.settings.max_import_bytes
        try:
            files = read_zip(data, max_bytes=cap)
            imported = validate_import(
                files, base, served_modules=plane.engine.pool.names,
                max_rank=plane.engine.pool.max_rank,
            )  # fmt: skip
        except ImportTooLarge as e:
            raise PayloadTooLarge(f"{e} (setting LORADOCK_MAX_IMPORT_BYTES)") from e
        except ImportRejected as e:
            raise Unprocessable(f"file: {e}") from e
        task = imported.task
        with self.db.session() as s:  # fail fast before writing anything
            self._check_new_adapter(s, tenant_id, name)
        adapter_id = new_id("ad")
        key = artifact_key(tenant_id, adapter_id, 1)
        origin = {k: imported.meta.get(k) for k in ("adapter_id", "version")}
        meta = {**imported.meta, "adapter_id": adapter_id, "version": 1, "imported_from": origin}
        files = {**imported.files, META: json.dumps(meta, indent=2, sort_keys=True).encode()}
        self.store.publish(key, files, {"adapter_id": adapter_id})
        try:
            with self.db.session() as s:
                self._check_new_adapter(s, tenant_id, name)
                s.add(
                    Adapter(
                        id=adapter_id, tenant_id=tenant_id, name=name, task=task.name,
                        labels=task.labels, status="ready", live_version=1,
                        created_at=utcnow(), updated_at=utcnow(),
                    )
                )  # fmt: skip
                s.flush()
                metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
                baseline = meta.get("baseline") if isinstance(meta.get("baseline"), dict) else {}
                s.add(
                    Version(
                        adapter_id=adapter_id,
                        version=1,
                        status="ready",
                        hyperparameters=meta.get("hyperparameters") or {},
                        metrics={**(metrics or {}), "winner": meta.get("winner")},
                        history=[],
                        baseline=baseline or {},
                        report={
                            "labels": task.labels,
                            "winner": meta.get("winner"),
                            "imported_from": origin,
                        },
                        artifact_key=key,
                        base_fingerprint=base.fingerprint,
                        created_at=utcnow(),
                    )
                )
        except BaseException as e:
            self.store.delete(key)  # no registry row: the artifact must not outlive the attempt
            if isinstance(e, IntegrityError):
                raise Conflict(f"an adapter named {name!r} already exists") from e
            raise
        return adapter_id

    # --- shared steps --------------------------------------------------------------------------

    def _wake(self) -> None:
        if self.runtime.jobs is not None:
            self.runtime.jobs.wake()

    def _check_servable(self, hp: Hyperparameters) -> None:
        """Refuse to train what the serving slots could not hold."""
        limit = self.runtime.settings.max_lora_rank
        if hp.rank > limit:
            raise Unprocessable(
                f"hyperparameters.rank: {hp.rank} > max_lora_rank {limit} of this server "
                "(setting LORADOCK_MAX_LORA_RANK)"
            )
        served = self.runtime.serve_targets()
        unknown = sorted(set(hp.target_modules or []) - set(served))
        if unknown:
            raise Unprocessable(
                f"hyperparameters.target_modules: {unknown} are not served by this server "
                f"(serving targets: {served}; setting LORADOCK_SERVE_TARGET_MODULES)"
            )

    def _datasets(
        self, task: type[tasks.Task], req: TrainRequest
    ) -> tuple[Dataset, Dataset | None]:
        self._check_servable(req.hyperparameters)
        s = self.runtime.settings
        try:
            train = validate_rows(
                req.training_data, task, max_rows=s.max_dataset_rows,
                max_text_chars=s.max_text_chars,
            )  # fmt: skip
            val = None
            if req.validation_data is not None:
                val = validate_rows(
                    req.validation_data, task, max_rows=s.max_dataset_rows,
                    max_text_chars=s.max_text_chars, dataset="validation_data", min_rows=2,
                )  # fmt: skip
                check_validation_labels(train, val)
                remove_leakage(train, val)
            else:
                check_split_feasible(train)
        except DatasetError as e:
            raise dataset_problem(e) from e
        return train, val

    def _queue(
        self,
        s: Session,
        tenant_id: str,
        adapter: Adapter,
        version: int,
        req: TrainRequest,
        train: Dataset,
        val: Dataset | None,
    ) -> Job:
        """Store the dataset, then add version + job rows (the caller's transaction commits)."""
        waiting = s.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.status == "queued")
        )
        limit = self.runtime.settings.max_queued_jobs_per_tenant
        if (waiting or 0) >= limit:
            raise TooManyRequests(
                f"this tenant has {waiting} jobs waiting to train, the limit is {limit} "
                "(setting LORADOCK_MAX_QUEUED_JOBS_PER_TENANT); retry when one has started",
                retry_after=30,
            )
        job = Job(
            id=new_id("job"),
            tenant_id=tenant_id,
            adapter_id=adapter.id,
            version=version,
            status="queued",
            spec={
                "hyperparameters": req.hyperparameters.model_dump(exclude_defaults=True),
                "promote": req.promote,
            },
            created_at=utcnow(),
        )
        self.store.publish(
            dataset_key(tenant_id, adapter.id, job.id),
            {DATASET_FILE: encode_dataset(train, val, req.validation_split)},
        )
        s.add(
            Version(
                adapter_id=adapter.id,
                version=version,
                status="training",
                hyperparameters=req.hyperparameters.model_dump(),
                report={"warnings": train.warnings + (val.warnings if val else [])},
                created_at=utcnow(),
            )
        )
        s.add(job)
        s.flush()
        return job

    def _check_new_adapter(self, s: Session, tenant_id: str, name: str) -> None:
        count = s.scalar(
            select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant_id)
        )
        limit = self.runtime.settings.max_adapters_per_tenant
        if (count or 0) >= limit:
            raise Conflict(
                f"this tenant has {count} adapters, the limit is {limit} "
                "(setting LORADOCK_MAX_ADAPTERS_PER_TENANT); delete one first"
            )
        if s.scalar(select(Adapter.id).where(Adapter.tenant_id == tenant_id, Adapter.name == name)):
            raise Conflict(f"an adapter named {name!r} already exists")
