"""Request and response bodies of the HTTP API (field names are the contract in API.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loradock.adapters import tasks
from loradock.adapters.training.hyperparameters import Hyperparameters

Scope = Literal["admin", "train", "predict"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MAX_VERSION = 2**31 - 1  # versions count up from 1; bounded so every database stores them
RESERVED_PREFIX = "ad_"  # adapter ids; a name may not look like one


def reserved_name_problem(name: str) -> str | None:
    """Routes take an adapter's id or its name: a name like an id would be ambiguous."""
    if name.startswith(RESERVED_PREFIX):
        return f"names starting with {RESERVED_PREFIX!r} are reserved for adapter ids"
    return None


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


class KeyInfo(BaseModel):
    """A key as listed: never its secret."""

    id: str
    tenant_id: str
    prefix: str
    scopes: list[Scope]
    created_at: datetime
    revoked_at: datetime | None


class KeyList(BaseModel):
    keys: list[KeyInfo]


class WhoAmI(BaseModel):
    tenant_id: str
    tenant_name: str
    key_id: str
    prefix: str
    scopes: list[Scope]


# --- adapters, versions, jobs ------------------------------------------------------------------

Promote = Literal["always", "if_better", "never"]
ROWS_DOC = (
    'Rows {"text": str, "label": str (classification) or number (regression), "group": optional '
    "str}; a group enables per-group metrics (bias check). Generation rows: "
    '{"messages": [{"role", "content"}, ...]} or {"prompt": str, "completion": str}.'
)


class VersionCreate(Strict):
    """Train a new version of an existing adapter."""

    training_data: list[dict[str, Any]] = Field(description=ROWS_DOC)
    validation_data: list[dict[str, Any]] | None = Field(
        None, description="Optional validation rows; else a stratified split of training_data."
    )
    validation_split: float = Field(0.2, ge=0.05, le=0.5, description="Share held out.")
    on_conflict: Literal["drop", "reject"] = Field(
        "drop",
        description="A text given different labels: drop all its rows with a warning naming "
        "them (drop), or refuse the dataset with 422 (reject). Exact duplicates are always "
        "dropped.",
    )
    label_names: dict[str, str] | list[str] | None = Field(
        None,
        description="Names for integer class ids in the rows' labels: a list (the id is the "
        "position) or an object {id: name}. Rows may then give ids (or names); the adapter's "
        "labels, predictions and metrics use the names.",
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    promote: Promote = Field(
        "if_better",
        description="Make the new version live: always, if it beats the live version on "
        "validation, or never.",
    )


class AdapterCreate(VersionCreate):
    name: str = Field(
        pattern=NAME_PATTERN,
        description=f"Unique per tenant; may not start with {RESERVED_PREFIX!r} (adapter ids do).",
    )
    task: str | None = Field(
        None,
        json_schema_extra={"enum": [*tasks.names(), None]},
        description="A task this server knows (one plugin each) that its base serves: an "
        "encoder serves classification, regression and multilabel; a causal LM serves "
        "generation. Default: the base's first (classification, or generation).",
    )

    @field_validator("name")
    @classmethod
    def _not_an_id(cls, v: str) -> str:
        problem = reserved_name_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        if v is not None:
            tasks.get(v)  # UnknownTask (a ValueError) names the known ones
        return v


class VersionOut(BaseModel):
    version: int
    status: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    baseline: dict[str, Any]
    report: dict[str, Any]
    hyperparameters: dict[str, Any]
    live: bool
    created_at: datetime


class AdapterFields(BaseModel):
    """What both views of an adapter show."""

    id: str
    name: str
    task: str
    labels: list[str]
    live_version: int | None
    status: str
    created_at: datetime


class AdapterOut(AdapterFields):
    versions: list[VersionOut]


class AdapterSummary(AdapterFields):
    """An adapter without its versions' histories and reports (`view=summary`)."""

    version_count: int
    latest_version: int | None
    live_metrics: dict[str, Any] = Field(
        description="The live version's scalar metrics, no per-class or per-group tables "
        "({} without a live version)."
    )
    drifting: bool = Field(
        False, description="This server's last drift check of the live traffic found drift."
    )


class AdapterList(BaseModel):
    adapters: list[AdapterOut] | list[AdapterSummary]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class JobSummary(BaseModel):
    """A job without its per-epoch history (`view=summary`)."""

    id: str
    kind: str = Field("train", description="train (a version) or predict (a batch job)")
    adapter_id: str
    version: int
    status: str
    progress: dict[str, Any]
    stop_reason: str | None
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobOut(JobSummary):
    history: list[dict[str, Any]]


class JobList(BaseModel):
    jobs: list[JobOut] | list[JobSummary]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class AdapterAndJob(BaseModel):
    adapter: AdapterOut
    job: JobOut
