"""API objects shaped like the server's answers (API.md), for the fake server."""

from __future__ import annotations

from typing import Any

T0 = "2026-01-01T00:00:00Z"
HISTORY = [
    {
        "epoch": 1,
        "step": 2,
        "train_loss": 0.9,
        "val_loss": 0.8,
        "val_accuracy": 0.6,
        "val_macro_f1": 0.55,
        "best": True,
    },
    {
        "epoch": 2,
        "step": 4,
        "train_loss": 0.5,
        "val_loss": 0.6,
        "val_accuracy": 0.8,
        "val_macro_f1": 0.79,
        "best": True,
    },
    {
        "epoch": 3,
        "step": 6,
        "train_loss": 0.3,
        "val_loss": 0.7,
        "val_accuracy": 0.75,
        "val_macro_f1": 0.74,
        "best": False,
    },
]


def version(n: int = 1, status: str = "ready", live: bool = True) -> dict[str, Any]:
    return {
        "version": n,
        "status": status,
        "metrics": {
            "best_epoch": 2,
            "stop_reason": "early_stopping",
            "epochs_run": 3,
            "train_loss": 0.5,
            "val_loss": 0.6,
            "val_accuracy": 0.8,
            "val_macro_f1": 0.79,
            "winner": "lora",
        },
        "history": HISTORY,
        "baseline": {
            "kind": "linear_probe",
            "val_loss": 0.7,
            "val_accuracy": 0.7,
            "val_macro_f1": 0.68,
        },
        "report": {
            "winner": "lora",
            "winner_reason": "LoRA val_macro_f1 0.79 beats 0.68",
            "promotion": {"promoted": live, "reason": "no live version yet"},
        },
        "hyperparameters": {"rank": 8},
        "live": live,
        "created_at": T0,
    }


def adapter(live: int | None = 1, status: str = "ready", versions: int = 1) -> dict[str, Any]:
    return {
        "id": "ad_1",
        "name": "tickets",
        "task": "classification",
        "labels": ["billing", "login"],
        "live_version": live,
        "status": status,
        "created_at": T0,
        "versions": [version(n, live=n == live) for n in range(1, versions + 1)],
    }


def job(status: str = "succeeded", history: list | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "id": "job_1",
        "adapter_id": "ad_1",
        "version": 1,
        "status": status,
        "progress": {"epoch": 3, "epochs": 20, "step": 6, "steps": 40, "loss": 0.3},
        "history": HISTORY if history is None else history,
        "stop_reason": "early_stopping" if status == "succeeded" else None,
        "error": None,
        "attempts": 1,
        "created_at": T0,
        "started_at": T0,
        "finished_at": T0 if status in ("succeeded", "failed", "cancelled") else None,
        **kw,
    }


def job_events(final: dict[str, Any] | None = None) -> list[tuple[str, dict]]:
    return [
        ("status", {"id": "job_1", "status": "running"}),
        ("progress", {}),
        ("epoch", HISTORY[0]),
        ("progress", {"epoch": 1, "epochs": 20, "step": 2, "steps": 40, "loss": 0.9}),
        ("epoch", HISTORY[1]),
        ("epoch", HISTORY[2]),
        ("status", {"id": "job_1", "status": "succeeded"}),
        ("end", final or job()),
    ]


def prediction(labels: list[str]) -> dict[str, Any]:
    return {
        "adapter": "ad_1",
        "version": 1,
        "predictions": [
            {"label": lbl, "score": 0.9, "scores": {lbl: 0.9, "other": 0.1}} for lbl in labels
        ],
    }
