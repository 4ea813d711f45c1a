"""Which validation metrics belong to what a version serves: one rule, used everywhere.

Training compares LoRA with the cheaper baseline (the linear probe) and serves the winner; the
metrics that describe the served model are the winner's. Promotion, the monitoring report, live
accuracy and the Prometheus gauges all read them through `served_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Model = Literal["lora", "probe", "base"]
# Always present in the served record (None when the task has no such score).
SERVED_KEYS = ("val_loss", "val_accuracy", "val_macro_f1")


def served_metrics(
    metrics: Mapping[str, Any] | None,
    baseline: Mapping[str, Any] | None,
    winner: str | None,
) -> dict[str, Any]:
    """`{"model": "lora"|"probe"|"base", "val_loss", "val_accuracy", "val_macro_f1", ...}`: every
    scalar `val_*` metric of the served model (the probe's or, for generation, the base's when
    it won, else LoRA's)."""
    model: Model = "probe" if winner == "probe" else "base" if winner == "base" else "lora"
    source = (baseline if model != "lora" else metrics) or {}
    out: dict[str, Any] = {"model": model}
    out.update({k: source.get(k) for k in SERVED_KEYS})
    out.update(
        {
            k: v
            for k, v in source.items()
            if k.startswith("val_") and isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    return out
