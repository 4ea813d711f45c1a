"""Typed views of the API's objects (API.md). Unknown fields are kept: the server may add them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Task = Literal["classification", "regression", "multilabel", "generation"]
Promote = Literal["always", "if_better", "never"]
# A text given different labels: drop its rows with a warning, or refuse the dataset (422).
OnConflict = Literal["drop", "reject"]
Scope = Literal["admin", "train", "predict"]
TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})


class Model(BaseModel):
    """Base of every API object: extra fields are kept and reachable as attributes."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Tenant(Model):
    id: str
    name: str
    created_at: datetime | None = None


class Key(Model):
    """An API key. `key` (the secret) is present only in the answer that created it."""

    id: str
    scopes: list[str]
    key: str | None = None
    tenant_id: str | None = None
    prefix: str | None = None
    created_at: datetime | None = None
    revoked_at: datetime | None = None


class Identity(Model):
    """Who a key is: GET /v1/whoami."""

    tenant_id: str
    tenant_name: str
    key_id: str
    prefix: str
    scopes: list[str]


class EpochRecord(Model):
    """One validation of a training run (every epoch, or every N steps when asked)."""

    epoch: int | float
    step: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_macro_f1: float | None = None
    best: bool | None = None


class VersionMetrics(Model):
    """Validation metrics of a version at its best epoch, and why training stopped."""

    best_epoch: int | float | None = None
    stop_reason: str | None = None
    epochs_run: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_macro_f1: float | None = None
    generalization_gap: float | None = None
    winner: str | None = None


class Baseline(Model):
    """The linear probe on the same validation set: what LoRA has to beat."""

    kind: str | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_macro_f1: float | None = None


class Version(Model):
    version: int
    status: str
    metrics: VersionMetrics = Field(default_factory=VersionMetrics)
    history: list[EpochRecord] = Field(default_factory=list)
    baseline: Baseline = Field(default_factory=Baseline)
    report: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    live: bool = False
    created_at: datetime | None = None


class Adapter(Model):
    id: str
    name: str
    task: str
    labels: list[str] = Field(default_factory=list)
    live_version: int | None = None
    status: str
    created_at: datetime | None = None
    versions: list[Version] = Field(default_factory=list)
    # The summary view (adapters.list(view="summary")) has these instead of `versions`.
    version_count: int | None = None
    latest_version: int | None = None
    live_metrics: dict[str, Any] | None = None

    def version(self, number: int | None = None) -> Version | None:
        """Version `number`, or the live one when None (None when there is no such version)."""
        wanted = self.live_version if number is None else number
        return next((v for v in self.versions if v.version == wanted), None)


class JobProgress(Model):
    epoch: int | float | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    fold: int | None = None
    folds: int | None = None
    final_fit: bool = False
    rows: int | None = None  # a prediction (batch) job: rows in all, and done so far
    rows_done: int | None = None
    rows_failed: int | None = None
    rows_per_second: float | None = None

    @property
    def fraction(self) -> float | None:
        """Share of the job done (0..1), counting cross-validation folds, when known."""
        if self.rows and self.rows_done is not None:
            return min(1.0, self.rows_done / self.rows)
        if not self.steps or self.step is None:
            return None
        done = min(1.0, self.step / self.steps)
        if self.folds and self.folds > 1:  # k folds, then the final fit on every row
            runs_before = self.folds if self.final_fit else (self.fold or 1) - 1
            done = (runs_before + done) / (self.folds + 1)
        return min(1.0, done)


class Job(Model):
    id: str
    kind: str = "train"  # or "predict" (a batch prediction job)
    adapter_id: str
    version: int
    status: str
    progress: JobProgress = Field(default_factory=JobProgress)
    history: list[EpochRecord] = Field(default_factory=list)
    stop_reason: str | None = None
    error: str | None = None
    attempts: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_JOB_STATES


class BatchSubmission(Model):
    """A queued batch prediction job: its rows, and those that cannot be predicted."""

    job: Job
    version: int
    rows: int
    rows_failed: int = 0
    warnings: list[str] = Field(default_factory=list)


class Prediction(Model):
    """Classification: `label`, `score` and `scores` per label; multi-label: `labels` (the
    predicted set, most confident first) and `scores`; regression: `value`."""

    label: str | None = None
    labels: list[str] | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    value: float | None = None
    truncated: bool = False


class PredictionResult(Model):
    adapter: str
    version: int
    predictions: list[Prediction]

    @property
    def labels(self) -> list[str | None]:
        return [p.label for p in self.predictions]


class FeedbackResult(Model):
    accepted: int | None = None
    version: int | None = None


class MonitoringReport(Model):
    """The drift and overfitting report; sections are plain dicts (their shape may grow)."""

    adapter: str | None = None
    name: str | None = None
    live_version: int | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    overfitting: dict[str, Any] = Field(default_factory=dict)
    drift: dict[str, Any] = Field(default_factory=dict)
    live_accuracy: dict[str, Any] = Field(default_factory=dict)
    flags: list[str] = Field(default_factory=list)


KEEP_ALIVE = "keep-alive"


@dataclass(frozen=True)
class JobEvent:
    """One server-sent event of GET /v1/jobs/{id}/events: `status`, `progress`, `epoch`, `end`,
    or `keep-alive` (the server's idle comment, no data)."""

    event: str
    data: dict[str, Any]
    id: str | None = None  # the stream's last event id so far (resume point on reconnect)


class TrainingResult(Model):
    """What `adapters.create`/`retrain` return: the adapter and the job of the trained version."""

    adapter: Adapter
    job: Job

    @property
    def version(self) -> Version | None:
        return self.adapter.version(self.job.version)

    @property
    def promoted(self) -> bool:
        return self.adapter.live_version == self.job.version

    def summary(self) -> str:
        from loradock_client.render import training_summary

        return training_summary(self)

    def __str__(self) -> str:
        return self.summary()
