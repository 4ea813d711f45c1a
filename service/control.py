"""The control plane: create, retrain, promote, delete and import adapters, once for every route.

Each operation takes a tenant id and plain inputs (training data as the uploaded bytes or form
fields, parsed and validated by the dataset worker in a child process), does its database and
store work synchronously (routes call it from the thread pool, never on the event loop), and
raises the typed errors of `service.errors`. Routes only translate HTTP to and from it. Promotion
is written once here (`promote`) for the promote route; the training job's automatic promotion
lives with the job (`service.jobs`) because it commits together with the job's outcome.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loradock.adapters.artifacts.files import META
from loradock.adapters.artifacts.importing import (
    ImportRejected,
    ImportTooLarge,
    read_zip,
    validate_import,
)
from loradock.adapters.artifacts.store import artifact_key
from loradock.service import batchjobs
from loradock.service.batchjobs import BatchInput
from loradock.service.datasets import Form, Limits, Prepared
from loradock.service.db.models import Adapter, Job, Version, new_id, utcnow
from loradock.service.errors import Conflict, PayloadTooLarge, TooManyRequests, Unprocessable
from loradock.service.jobs import DATASET_FILE, dataset_key
from loradock.service.lookup import find_adapter, find_version
from loradock.service.runtime import Runtime
from loradock.service.storage import check_quota

ACTIVE_JOB = ("queued", "running")


@dataclass(frozen=True)
class Queued:
    adapter_id: str
    job_id: str


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

    def create(self, tenant_id: str, upload: bytes | Form) -> Queued:
        """A new adapter whose version 1 trains from `upload` (a JSON body, or a form with a
        training file, parsed and validated by the dataset worker): queued, 202 semantics."""
        prep = self.runtime.datasets.prepare(upload, "AdapterCreate", None, self._limits())
        name = prep.fields["name"]
        try:
            with self.db.session() as s:
                self._check_new_adapter(s, tenant_id, name)
                adapter = Adapter(
                    id=new_id("ad"), tenant_id=tenant_id, name=name, task=prep.fields["task"],
                    labels=prep.labels, status="training", created_at=utcnow(),
                    updated_at=utcnow(),
                )  # fmt: skip
                s.add(adapter)
                s.flush()
                job = self._queue(s, tenant_id, adapter, 1, prep)
                queued = Queued(adapter.id, job.id)
        except IntegrityError as e:
            raise Conflict(f"an adapter named {name!r} already exists") from e
        self._wake()
        return queued

    def retrain(self, tenant_id: str, adapter: str, upload: bytes | Form) -> Queued:
        """A new version of an existing adapter (one training job per adapter at a time)."""
        with self.db.session() as s:
            task = find_adapter(s, tenant_id, adapter).task
        prep = self.runtime.datasets.prepare(upload, "VersionCreate", task, self._limits())
        try:
            with self.db.session() as s:
                row = find_adapter(s, tenant_id, adapter)
                busy = next(
                    (j.id for j in s.scalars(select(Job).where(
                        Job.adapter_id == row.id, Job.status.in_(ACTIVE_JOB)))
                     if j.kind == "train"),
                    None,
                )  # fmt: skip
                if busy:
                    raise Conflict(
                        f"adapter {row.name!r} is already training (job {busy}); wait or cancel it"
                    )
                latest = s.scalar(
                    select(func.max(Version.version)).where(Version.adapter_id == row.id)
                )
                job = self._queue(s, tenant_id, row, (latest or 0) + 1, prep)
                queued = Queued(row.id, job.id)
        except IntegrityError as e:
            raise Conflict("another version was created at the same time; retry") from e
        self._wake()
        return queued

    # --- batch prediction ----------------------------------------------------------------------

    def queue_batch(
        self, tenant_id: str, adapter: str, version: int | None, batch: BatchInput
    ) -> tuple[str, int]:
        """A prediction job over `batch` on `version` (default: the live one, pinned now); the
        inputs are stored before the job row commits. Returns (job id, version)."""
        data = batch.encode()
        with self.db.session() as s:
            row = find_adapter(s, tenant_id, adapter)
            number = version or row.live_version
            if number is None:
                raise Conflict(f"adapter {row.name!r} has no live version; pass a version")
            ver = find_version(s, row, number)
            if ver.status != "ready":
                raise Conflict(f"version {number} is {ver.status}; only a ready version predicts")
            self._check_queue(s, tenant_id)
            job = Job(
                id=new_id("job"), tenant_id=tenant_id, adapter_id=row.id, version=number,
                status="queued", created_at=utcnow(),
                spec={"kind": batchjobs.KIND, "rows": len(batch.texts)},
                progress={"rows": len(batch.texts), "rows_done": 0,
                          "rows_failed": len(batch.errors)},
            )  # fmt: skip
            check_quota(self.store, tenant_id, len(data),
                        self.runtime.settings.max_storage_bytes_per_tenant)  # fmt: skip
            self.store.publish(dataset_key(tenant_id, row.id, job.id), {DATASET_FILE: data})
            s.add(job)
            job_id = job.id
        self._wake()
        return job_id, number

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
        check_quota(self.store, tenant_id, sum(len(d) for d in files.values()),
                    self.runtime.settings.max_storage_bytes_per_tenant)  # fmt: skip
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

    def _limits(self) -> Limits:
        s = self.runtime.settings
        return Limits(
            max_rows=s.max_dataset_rows,
            max_text_chars=s.max_text_chars,
            max_lora_rank=s.max_lora_rank,
            serve_targets=tuple(self.runtime.serve_targets()),
            num_layers=self.runtime.base.num_layers if self.runtime.base is not None else 10**6,
            base_kind=self.runtime.base.kind if self.runtime.base is not None else "encoder",
        )

    def _queue(
        self,
        s: Session,
        tenant_id: str,
        adapter: Adapter,
        version: int,
        prep: Prepared,
    ) -> Job:
        """Store the dataset, then add version + job rows (the caller's transaction commits)."""
        self._check_queue(s, tenant_id)
        job = Job(
            id=new_id("job"),
            tenant_id=tenant_id,
            adapter_id=adapter.id,
            version=version,
            status="queued",
            spec={
                "hyperparameters": prep.fields["hyperparameters_given"],
                "promote": prep.fields["promote"],
            },
            created_at=utcnow(),
        )
        check_quota(self.store, tenant_id, len(prep.dataset),
                    self.runtime.settings.max_storage_bytes_per_tenant)  # fmt: skip
        self.store.publish(
            dataset_key(tenant_id, adapter.id, job.id),
            {DATASET_FILE: prep.dataset},
        )
        s.add(
            Version(
                adapter_id=adapter.id,
                version=version,
                status="training",
                hyperparameters=prep.fields["hyperparameters"],
                report={"warnings": list(prep.warnings)},
                created_at=utcnow(),
            )
        )
        s.add(job)
        s.flush()
        return job

    def _check_queue(self, s: Session, tenant_id: str) -> None:
        waiting = s.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.status == "queued")
        )
        limit = self.runtime.settings.max_queued_jobs_per_tenant
        if (waiting or 0) >= limit:
            raise TooManyRequests(
                f"this tenant has {waiting} jobs waiting to run, the limit is {limit} "
                "(setting LORADOCK_MAX_QUEUED_JOBS_PER_TENANT); retry when one has started",
                retry_after=30,
            )

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
