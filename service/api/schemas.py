"""Request and response bodies of the HTTP API (field names are the contract in API.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Scope = Literal["admin", "train", "predict"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantCreate(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="Unique tenant name.")


class TenantOut(BaseModel):
    id: str
    name: str
    created_at: datetime


class TenantList(BaseModel):
    tenants: list[TenantOut]


class KeyCreate(Strict):
    scopes: list[Scope] = Field(min_length=1, max_length=3, description="Scopes of the new key.")


class KeyOut(BaseModel):
    id: str
    tenant_id: str
    key: str = Field(description="The secret; shown once, only its hash is stored.")
    prefix: str
    scopes: list[Scope]
    created_at: datetime
