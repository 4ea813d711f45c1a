"""What the artifact store holds per tenant, and what it holds for nobody.

- `tenant_usage` / `check_quota`: bytes a tenant keeps in the store (artifacts and datasets of
  pending jobs), against LORADOCK_MAX_STORAGE_BYTES_PER_TENANT.
- `sweep_orphans`: at start-up, delete store entries no registry row refers to: artifacts of a
  publish whose registry write never committed (a crash, a full disk), datasets of jobs that have
  ended or no longer exist. Entries younger than `min_age` are left alone, since on a shared
  registry another replica may be between its publish and its commit.
- `registry_looks_lost`: an empty registry beside a store (or key file) with tenant data means
  the registry was lost; bootstrapping a new one would orphan every tenant silently.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from loradock.adapters.artifacts.store import ArtifactStore, StoreError
from loradock.service.db.models import File, Job, Tenant, Version
from loradock.service.db.registry import Database
from loradock.service.errors import PayloadTooLarge

log = logging.getLogger(__name__)


def tenant_usage(store: ArtifactStore, tenant_id: str) -> int:
    """Bytes of every artifact and dataset the store keeps under the tenant's prefix."""
    total = 0
    for key in store.list_keys(tenant_id):
        try:
            total += sum(entry.size for entry in store.manifest(key).files.values())
        except StoreError:
            continue  # being deleted, or corrupt: not counted
    return total


def check_quota(store: ArtifactStore, tenant_id: str, adding: int, quota: int) -> None:
    """413 when storing `adding` more bytes would take the tenant over `quota` (0 = none)."""
    if quota <= 0:
        return
    used = tenant_usage(store, tenant_id)
    if used + adding > quota:
        raise PayloadTooLarge(
            f"this tenant stores {used} bytes; {adding} more would exceed its quota of {quota} "
            "bytes (setting LORADOCK_MAX_STORAGE_BYTES_PER_TENANT); delete adapters or versions "
            "it no longer needs"
        )


def _age_seconds(store: ArtifactStore, key: str) -> float:
    try:
        created = datetime.fromisoformat(store.manifest(key).created_at)
    except (StoreError, ValueError):
        return float("inf")  # unreadable: not a publish in progress
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return (datetime.now(UTC) - created).total_seconds()


def sweep_orphans(db: Database, store: ArtifactStore, min_age: float = 0.0) -> int:
    """Delete the store entries no registry row needs; returns how many."""
    keys = store.list_keys()
    if not keys:
        return 0
    with db.session() as s:
        artifacts = set(
            s.scalars(select(Version.artifact_key).where(Version.artifact_key.is_not(None)))
        )
        pending = set(s.scalars(select(Job.id).where(Job.status.in_(("queued", "running")))))
        jobs = set(s.scalars(select(Job.id)))
        files = set(s.scalars(select(File.id)))
    removed = 0
    for key in keys:
        parts = key.split("/")
        if len(parts) == 4 and parts[2] == "datasets":  # a job's inputs, while it may run
            needed = parts[3] in pending
        elif len(parts) == 4 and parts[2] == "batches":  # a prediction job's results
            needed = parts[3] in jobs
        elif len(parts) == 4 and parts[1] == "files":  # an uploaded file, while it exists
            needed = parts[3] in files
        else:
            needed = key in artifacts
        if needed or _age_seconds(store, key) < min_age:
            continue
        try:
            store.delete(key)
            removed += 1
        except StoreError as e:
            log.warning("sweep: cannot delete %s: %s", key, e)
    if removed:
        log.info("sweep: deleted %d store entries no registry row refers to", removed)
    return removed


def registry_looks_lost(db: Database, store: ArtifactStore, key_path: Path) -> str | None:
    """Why bootstrapping would be wrong (the registry is empty but earlier state exists), or None
    when the registry has tenants or there is nothing to lose."""
    with db.session() as s:
        if s.scalar(select(Tenant.id).limit(1)) is not None:
            return None
    found = []
    if key_path.exists():
        found.append(f"the bootstrap key file {key_path.name} of an earlier registry")
    keys = store.list_keys()
    if keys:
        tenants = sorted({k.split("/", 1)[0] for k in keys})
        found.append(f"{len(keys)} artifacts of {len(tenants)} tenants in the store")
    if not found:
        return None
    return (
        "the registry is empty but the data directory holds " + " and ".join(found) + ": the "
        "registry database was lost or replaced. Restore it (every tenant's adapters are "
        "orphaned otherwise), or start with LORADOCK_ALLOW_REBOOTSTRAP=true to begin a new "
        "registry anyway"
    )
