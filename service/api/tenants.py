"""Tenants and API keys (scope `admin`)."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Query, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loradock.service.api.deps import AdminDep, DatabaseDep, PrincipalDep, ReadyRuntimeDep, now
from loradock.service.api.schemas import (
    KeyCreate,
    KeyInfo,
    KeyList,
    KeyOut,
    TenantCreate,
    TenantList,
    TenantOut,
    WhoAmI,
)
from loradock.service.control import Control
from loradock.service.db.models import Adapter, ApiKey, File, Job, Tenant, new_id
from loradock.service.db.registry import generate_key, hash_key
from loradock.service.errors import Conflict, NotFound, Unprocessable

router = APIRouter(prefix="/v1", tags=["tenants"])


@router.post("/tenants", status_code=201, response_model=TenantOut)
def create_tenant(body: TenantCreate, db: DatabaseDep, _: AdminDep) -> TenantOut:
    tenant = Tenant(id=new_id("tn"), name=body.name, created_at=now())
    try:
        with db.session() as s:
            s.add(tenant)
    except IntegrityError as e:
        raise Conflict(f"a tenant named {body.name!r} already exists") from e
    return TenantOut.model_validate(tenant, from_attributes=True)


@router.get("/tenants", response_model=TenantList)
def list_tenants(db: DatabaseDep, _: AdminDep) -> TenantList:
    with db.session() as s:
        rows = s.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)).all()
        return TenantList(tenants=[TenantOut.model_validate(t, from_attributes=True) for t in rows])


@router.post("/tenants/{tenant_id}/keys", status_code=201, response_model=KeyOut)
def create_key(tenant_id: str, body: KeyCreate, db: DatabaseDep, admin: AdminDep) -> KeyOut:
    """A key for a tenant. `admin` is the operator's scope (it reaches every tenant), so admin
    keys are only issued inside the operator's own tenant: a customer tenant can never hold one
    (OWASP API5, broken function-level authorization)."""
    secret = generate_key()
    scopes = sorted(set(body.scopes))
    if "admin" in scopes and tenant_id != admin.tenant_id:
        raise Unprocessable(
            "scopes: 'admin' keys can only be created in the operator's own tenant "
            f"({admin.tenant_id}); give customer tenants 'train' and/or 'predict'"
        )
    with db.session() as s:
        if s.get(Tenant, tenant_id) is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        key = ApiKey(
            id=new_id("key"),
            tenant_id=tenant_id,
            key_hash=hash_key(secret),
            prefix=secret[:12],
            scopes=scopes,
            created_at=now(),
        )
        s.add(key)
    return KeyOut(
        id=key.id,
        tenant_id=tenant_id,
        key=secret,
        prefix=key.prefix,
        scopes=scopes,  # type: ignore[arg-type]
        created_at=key.created_at,
    )


def _last_admin_key(s: Session, key: ApiKey) -> bool:
    """True when `key` is the only active admin key left: revoking it would lock everyone out."""
    if "admin" not in key.scopes:
        return False
    others = [
        k
        for k in s.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None), ApiKey.id != key.id))
        if "admin" in k.scopes
    ]
    return not others


def _active_key(s: Session, key_id: str) -> ApiKey:
    key = s.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        raise NotFound(f"API key {key_id!r} not found")
    return key


@router.delete("/keys/{key_id}", status_code=204, response_class=Response)
def revoke_key(key_id: str, db: DatabaseDep, _: AdminDep) -> Response:
    """Revoke a key at once (open event streams end at their next poll). The last active admin
    key cannot be revoked (409): create another admin key first, or rotate it."""
    with db.session() as s:
        key = _active_key(s, key_id)
        if _last_admin_key(s, key):
            raise Conflict(
                f"API key {key_id!r} is the last active admin key; revoking it would lock the "
                "operator out. Create another admin key first, or rotate this one"
            )
        key.revoked_at = now()
    return Response(status_code=204)


@router.post("/keys/{key_id}/rotate", status_code=201, response_model=KeyOut)
def rotate_key(key_id: str, db: DatabaseDep, _: AdminDep) -> KeyOut:
    """A new key with the same tenant and scopes, and the old one revoked, in one transaction
    (also for the bootstrap admin key). The new secret is in this answer only."""
    secret = generate_key()
    with db.session() as s:
        old = _active_key(s, key_id)
        old.revoked_at = now()
        key = ApiKey(
            id=new_id("key"), tenant_id=old.tenant_id, key_hash=hash_key(secret),
            prefix=secret[:12], scopes=list(old.scopes), created_at=now(),
        )  # fmt: skip
        s.add(key)
    return KeyOut(
        id=key.id, tenant_id=key.tenant_id, key=secret, prefix=key.prefix,
        scopes=key.scopes, created_at=key.created_at,
    )  # fmt: skip


@router.get("/keys", response_model=KeyList)
def list_keys(
    db: DatabaseDep,
    admin: AdminDep,
    tenant_id: str | None = Query(None, description="Whose keys; default the caller's tenant."),
    include_revoked: bool = Query(False),
) -> KeyList:
    """Keys of one tenant, without their secrets (only the hashes are stored)."""
    tenant = tenant_id or admin.tenant_id
    with db.session() as s:
        if s.get(Tenant, tenant) is None:
            raise NotFound(f"tenant {tenant!r} not found")
        query = select(ApiKey).where(ApiKey.tenant_id == tenant)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        rows = s.scalars(query.order_by(ApiKey.created_at, ApiKey.id)).all()
        return KeyList(keys=[KeyInfo.model_validate(k, from_attributes=True) for k in rows])


@router.get("/whoami", response_model=WhoAmI)
def whoami(db: DatabaseDep, principal: PrincipalDep) -> WhoAmI:
    """The caller's tenant and key (any valid key, whatever its scopes)."""
    with db.session() as s:
        key = _active_key(s, principal.key_id)
        tenant = s.get(Tenant, principal.tenant_id)
        assert tenant is not None
        return WhoAmI(
            tenant_id=tenant.id, tenant_name=tenant.name, key_id=key.id, prefix=key.prefix,
            scopes=key.scopes,
        )  # fmt: skip


@router.delete("/tenants/{tenant_id}", status_code=204, response_class=Response)
def delete_tenant(
    tenant_id: str, runtime: ReadyRuntimeDep, db: DatabaseDep, admin: AdminDep
) -> Response:
    """A tenant and everything it owns: keys, adapters with their versions, jobs and feedback,
    artifacts and datasets in the store, serving state. The operator's own tenant cannot be
    deleted (409)."""
    if tenant_id == admin.tenant_id:
        raise Conflict("the operator's own tenant (holding the admin keys) cannot be deleted")
    with db.session() as s:
        if s.get(Tenant, tenant_id) is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        names = s.scalars(select(Adapter.id).where(Adapter.tenant_id == tenant_id)).all()
    control = Control(runtime)
    for adapter_id in names:  # each: rows, running jobs, serving state, artifacts
        with contextlib.suppress(NotFound):  # deleted meanwhile
            control.delete(tenant_id, adapter_id)
    with db.session() as s:
        for model in (Job, ApiKey, File):
            for row in s.scalars(select(model).where(model.tenant_id == tenant_id)):
                s.delete(row)
        tenant = s.get(Tenant, tenant_id)
        if tenant is not None:
            s.delete(tenant)
    if runtime.store is not None:
        runtime.store.delete_prefix(tenant_id)  # anything left: orphaned datasets
    return Response(status_code=204)
