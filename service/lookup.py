"""Tenant-scoped lookups: another tenant's object answers exactly like a missing one (404)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from loradock.service.db.models import Adapter, Job, Version
from loradock.service.errors import NotFound


def find_adapter(s: Session, tenant_id: str, ref: str) -> Adapter:
    """By id (`ad_...`) or by name, within the caller's tenant only."""
    column = Adapter.id if ref.startswith("ad_") else Adapter.name
    adapter = s.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, column == ref))
    if adapter is None:
        raise NotFound(f"adapter {ref!r} not found")
    return adapter


def find_version(s: Session, adapter: Adapter, version: int) -> Version:
    ver = s.scalar(
        select(Version).where(Version.adapter_id == adapter.id, Version.version == version)
    )
    if ver is None:
        raise NotFound(f"adapter {adapter.name!r} has no version {version}")
    return ver


def find_job(s: Session, tenant_id: str, job_id: str) -> Job:
    job = s.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.id == job_id))
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    return job
