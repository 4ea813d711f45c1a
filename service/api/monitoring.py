"""Feedback (true labels -> live accuracy) and the per-adapter monitoring report."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import case, func, select

from loradock.adapters.tasks.base import Task
from loradock.service.api.deps import DatabaseDep, Principal, ReadyRuntimeDep, now, require
from loradock.service.db.models import Feedback, Version
from loradock.service.errors import Unprocessable
from loradock.service.jobs import version_served
from loradock.service.lookup import find_adapter

router = APIRouter(prefix="/v1", tags=["monitoring"])
ReadDep = Depends(require("predict"))
GAP_RATIO = 0.5  # generalization gap above half the validation loss counts as large


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)
    label: str | float | list[str] = Field(
        description="The true label: a class, a value, or a multi-label adapter's set of labels."
    )

    @field_validator("text", "label")
    @classmethod
    def _no_nul(cls, v: str | float | list[str]) -> str | float | list[str]:
        # Stored in the registry: PostgreSQL text cannot hold NUL; no real label or text has one.
        values = v if isinstance(v, list) else [v]
        if any(isinstance(x, str) and "\x00" in x for x in values):
            raise ValueError("must not contain NUL characters")
        return v


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[FeedbackItem] = Field(min_length=1)


@router.post("/adapters/{adapter}/feedback", status_code=202)
async def feedback(
    adapter: str,
    body: FeedbackRequest,
    runtime: ReadyRuntimeDep,
    db: DatabaseDep,
    principal: Principal = ReadDep,
) -> dict[str, Any]:
    """True labels for texts: each is predicted by the live version and stored, so the report can
    show accuracy on live traffic next to validation accuracy."""
    labels: list[str] = []

    def check(task: Task) -> None:  # before any compute: labels this adapter can predict
        for n, item in enumerate(body.items):
            try:
                labels.append(task.check_feedback_label(item.label))
            except ValueError as e:
                raise Unprocessable(f"items[{n}].label: {e}") from None

    answer = await runtime.require_serving().predict(
        principal.tenant_id, adapter, None, [i.text for i in body.items],
        protocol="feedback", observe=False, check=check,
    )  # fmt: skip

    def store() -> None:
        with db.session() as s:
            for item, label, prediction in zip(body.items, labels, answer.predictions,
                                               strict=True):  # fmt: skip
                s.add(
                    Feedback(
                        adapter_id=answer.ref.adapter_id,
                        version=answer.ref.version,
                        text=item.text,
                        label=label,
                        predicted=answer.task.prediction_value(prediction),
                        created_at=now(),
                    )
                )

    await asyncio.to_thread(store)
    return {"accepted": len(answer.predictions), "version": answer.ref.version}


def _live_accuracy(db: Any, adapter_id: str, version: int | None, val_acc: float | None) -> dict:
    with db.session() as s:
        total, correct = s.execute(
            select(
                func.count(Feedback.id),
                func.sum(case((Feedback.label == Feedback.predicted, 1), else_=0)),
            ).where(Feedback.adapter_id == adapter_id, Feedback.version == version)
        ).one()
        if not total:
            return {"items": 0, "series": []}
        recent = s.execute(
            select(Feedback.created_at, Feedback.label == Feedback.predicted)
            .where(Feedback.adapter_id == adapter_id, Feedback.version == version)
            .order_by(Feedback.created_at.desc(), Feedback.id.desc())
            .limit(SERIES_ITEMS)
        ).all()[::-1]
    accuracy = (correct or 0) / total
    out: dict[str, Any] = {"items": total, "accuracy": round(accuracy, 4)}
    if val_acc is not None:
        out["validation_accuracy"] = val_acc
        out["gap"] = round(val_acc - accuracy, 4)
    out["series"] = accuracy_series(recent)
    return out


SERIES_ITEMS = 5000  # the most recent feedback items the series covers
SERIES_POINTS = 12


def accuracy_series(items: list[Any], points: int = SERIES_POINTS) -> list[dict[str, Any]]:
    """Live accuracy over time: the items (created_at, correct) in arrival order, cut into up to
    `points` runs of equal size (at least 10 items each), each with its time span and accuracy."""
    if not items:
        return []
    size = max(10, -(-len(items) // points))
    out = []
    for i in range(0, len(items), size):
        run = items[i : i + size]
        out.append({
            "from": run[0][0].isoformat(),
            "to": run[-1][0].isoformat(),
            "items": len(run),
            "accuracy": round(sum(1 for _, ok in run if ok) / len(run), 4),
        })  # fmt: skip
    return out


def _overfitting(ver: Version | None) -> tuple[dict[str, Any], list[str]]:
    if ver is None:
        return {"verdict": "no live version"}, []
    m = ver.metrics or {}
    flags = []
    best, run = m.get("best_epoch"), m.get("epochs_run")
    if m.get("stop_reason") == "early_stopping" and best is not None and run is not None:
        flags.append(f"validation loss rose after epoch {best}; stopped at {run}, restored {best}")
    gap, val = m.get("generalization_gap"), m.get("val_loss")
    verdict = "ok"
    if gap is not None and val and gap > GAP_RATIO * val:
        verdict = "large generalization gap"
        flags.append(
            f"generalization gap {gap:.3f} (validation loss {val:.3f} vs training "
            f"{m.get('train_loss', 0):.3f} at epoch {best}): the adapter fits its training "
            "data much better than unseen data"
        )
    report = ver.report or {}
    if report.get("winner") == "probe":
        flags.append("LoRA did not beat the linear probe on validation: serving the probe alone")
    elif report.get("winner") == "base":
        flags.append("the adapter did not beat the base model on validation loss: serving the "
                     "base model alone")  # fmt: skip
    return {
        "verdict": verdict,
        "generalization_gap": gap,
        "best_epoch": best,
        "epochs_run": run,
        "stop_reason": m.get("stop_reason"),
        "winner": report.get("winner"),
        "winner_reason": report.get("winner_reason"),
    }, flags


def _forgetting(ver: Version | None, threshold: float) -> tuple[dict[str, Any], list[str]]:
    """Generation: the reference text's perplexity under the adapter vs the base. A rise beyond
    `threshold` (LORADOCK_FORGETTING_THRESHOLD) is flagged: the adapter lost general ability."""
    m = (ver.metrics if ver is not None else None) or {}
    adapter, base = m.get("reference_perplexity"), m.get("base_reference_perplexity")
    if adapter is None or base is None or not base:
        return {}, []
    served_base = (ver.report or {}).get("winner") == "base" if ver is not None else False
    rise = adapter / base - 1
    out = {"reference_perplexity": adapter, "base_reference_perplexity": base,
           "rise": round(rise, 4), "threshold": threshold,
           "verdict": "forgetting" if rise > threshold and not served_base else "ok"}  # fmt: skip
    flags = []
    if out["verdict"] == "forgetting":
        flags.append(
            f"reference perplexity rose {rise:.0%} (base {base:.2f} -> adapter {adapter:.2f}, "
            f"threshold {threshold:.0%}): the adapter lost some general language ability"
        )
    return out, flags


def _drift_flags(drift: dict[str, Any]) -> list[str]:
    flags = []
    signals = drift.get("signals", {})
    for name in drift.get("drifted_signals", []):
        sig = signals.get(name, {})
        if name == "predicted_label":
            ref, cur = sig["reference"], sig["current"]
            label = max(ref, key=lambda k: abs(cur[k] - ref[k]))
            flags.append(
                f"predictions drifted: {label!r} {ref[label]:.0%} -> {cur[label]:.0%} "
                f"(PSI {sig['psi']:.2f})"
            )
        elif name == "embedding":
            flags.append(
                f"inputs drifted: embedding MMD test p = {sig['p_value']:.3f} "
                f"(the live texts are unlike the validation texts)"
            )
        else:
            flags.append(f"{name.replace('_', ' ')} drifted (PSI {sig.get('psi', 0):.2f})")
    return flags


@router.get("/adapters/{adapter}/monitoring")
def monitoring(
    adapter: str, runtime: ReadyRuntimeDep, db: DatabaseDep, principal: Principal = ReadDep
) -> dict[str, Any]:
    """Training history, the served model's validation metrics, overfitting verdict, drift per
    signal, live accuracy, plain flags. (A plain `def`: its database and monitor work runs in
    the thread pool, never on the event loop that batches predictions.)"""
    with db.session() as s:
        row = find_adapter(s, principal.tenant_id, adapter)
        ver = None
        if row.live_version is not None:
            ver = s.scalar(
                select(Version).where(
                    Version.adapter_id == row.id, Version.version == row.live_version
                )
            )
        adapter_id, name, live = row.id, row.name, row.live_version
        overfitting, flags = _overfitting(ver)
        forgetting, forgot = _forgetting(ver, runtime.settings.forgetting_threshold)
        flags += forgot
        served = version_served(ver) if ver is not None else {}
        training = {
            "history": ver.history if ver else [],
            "metrics": {k: v for k, v in (ver.metrics or {}).items() if k != "per_class"}
            if ver
            else {},
            "baseline": {k: v for k, v in (ver.baseline or {}).items() if k != "per_class"}
            if ver
            else {},
            "served": served,
            "warnings": (ver.report or {}).get("warnings", []) if ver else [],
        }
    val_acc = served.get("val_accuracy")
    drift: dict[str, Any] = {"status": "monitor not running"}
    if runtime.monitor is not None:
        runtime.monitor.drain(10.0)
        drift = runtime.monitor.report(adapter_id, live)
    flags += _drift_flags(drift)
    live_acc = _live_accuracy(db, adapter_id, live, val_acc)
    if live_acc.get("gap") is not None and live_acc["items"] >= 20 and live_acc["gap"] > 0.1:
        flags.append(
            f"live accuracy {live_acc['accuracy']:.0%} on {live_acc['items']} labelled items is "
            f"{live_acc['gap']:.0%} below the served model's validation accuracy {val_acc:.0%}"
        )
    return {
        "adapter": adapter_id,
        "name": name,
        "live_version": live,
        "training": training,
        "overfitting": overfitting,
        "forgetting": forgetting,
        "drift": drift,
        "live_accuracy": live_acc,
        "flags": flags,
    }
