"""Request dependencies: the runtime, the caller's identity and scope checks."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select

from loradock.service.db.models import ApiKey
from loradock.service.db.registry import Database, hash_key
from loradock.service.errors import Forbidden, Unauthorized
from loradock.service.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_ready_runtime(runtime: RuntimeDep) -> Runtime:
    runtime.require_ready()
    return runtime


ReadyRuntimeDep = Annotated[Runtime, Depends(get_ready_runtime)]


def get_db(runtime: ReadyRuntimeDep) -> Database:
    assert runtime.db is not None
    return runtime.db


DatabaseDep = Annotated[Database, Depends(get_db)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant acting through one API key with some scopes."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        # admin may do everything; train keys may also read and predict.
        if "admin" in self.scopes or scope in self.scopes:
            return True
        return scope == "predict" and "train" in self.scopes


def authenticate(request: Request, db: DatabaseDep) -> Principal:
    """Check `Authorization: Bearer <key>` against the stored key hashes."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization header must be 'Bearer <api key>'")
    with db.session() as s:
        key = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token)))
        if key is None or key.revoked_at is not None:
            raise Unauthorized("invalid or revoked API key")
        request.state.tenant_id = key.tenant_id  # read by OverloadShedMiddleware
        return Principal(tenant_id=key.tenant_id, key_id=key.id, scopes=frozenset(key.scopes))


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require(scope: str):
    """A dependency that authenticates and then insists on `scope`."""

    def check(principal: PrincipalDep) -> Principal:
        if not principal.allows(scope):
            raise Forbidden(f"this API key lacks the {scope!r} scope")
        return principal

    return check


AdminDep = Annotated[Principal, Depends(require("admin"))]


def now() -> datetime:
    return datetime.now(UTC)
