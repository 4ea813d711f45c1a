"""Tenants and API keys (scope `admin`)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from loradock.service.api.deps import AdminDep, DatabaseDep, now
from loradock.service.api.schemas import KeyCreate, KeyOut, TenantCreate, TenantList, TenantOut
from loradock.service.db.models import ApiKey, Tenant, new_id
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


@router.delete("/keys/{key_id}", status_code=204, response_class=Response)
def revoke_key(key_id: str, db: DatabaseDep, _: AdminDep) -> Response:
    with db.session() as s:
        key = s.get(ApiKey, key_id)
        if key is None or key.revoked_at is not None:
            raise NotFound(f"API key {key_id!r} not found")
        key.revoked_at = now()
    return Response(status_code=204)
