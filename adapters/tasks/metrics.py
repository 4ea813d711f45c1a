"""Validation metrics: loss, accuracy, macro-F1 (micro-F1 for multi-label), per-class
precision/recall, per-group gaps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def classification_metrics(
    logits: torch.Tensor,  # [n, C]
    targets: torch.Tensor,  # [n] class indices
    labels: Sequence[str],
    groups: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    logits = logits.detach().float().cpu()
    targets = targets.cpu()
    n_classes = len(labels)
    pred = logits.argmax(dim=1)
    loss = float(F.cross_entropy(logits, targets)) if len(targets) else float("nan")
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)  # [true, predicted]
    conf.index_put_((targets, pred), torch.ones_like(targets), accumulate=True)
    tp = conf.diag().float()
    predicted = conf.sum(dim=0).float()
    actual = conf.sum(dim=1).float()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(
        denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp)
    )
    # Macro-F1 over the classes that occur in the truth or the predictions (scikit-learn's
    # f1_score(average="macro")): a class predicted but absent from validation counts as F1 0.
    present = (actual > 0) | (predicted > 0)
    macro_f1 = float(f1[present].mean()) if bool(present.any()) else 0.0
    per_class = {
        label: {
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
            "support": int(actual[i]),
        }
        for i, label in enumerate(labels)
    }
    correct = (pred == targets).float()
    out: dict[str, Any] = {
        "loss": loss,
        "accuracy": float(correct.mean()) if len(targets) else 0.0,
        "macro_f1": macro_f1,
        "per_class": per_class,
    }
    out.update(_group_metrics(correct, groups, "accuracy"))
    return out


def regression_metrics(
    pred: torch.Tensor,  # [n] in label units
    targets: torch.Tensor,  # [n] in label units
    groups: Sequence[str | None] | None = None,
    *,
    scale: float = 1.0,  # the label std: loss is reported on standardized labels, like training
) -> dict[str, Any]:
    pred = pred.detach().float().cpu()
    targets = targets.float().cpu()
    err = pred - targets
    mse = float((err**2).mean())
    var = float(((targets - targets.mean()) ** 2).mean())
    out: dict[str, Any] = {
        "loss": mse / (scale**2),
        "mse": mse,
        "mae": float(err.abs().mean()),
        "r2": 1.0 - mse / var if var > 0 else 0.0,
    }
    out.update(_group_metrics(err.abs(), groups, "mae"))
    return out


def _group_metrics(
    per_row: torch.Tensor, groups: Sequence[str | None] | None, name: str
) -> dict[str, Any]:
    """Per-group mean of a per-row score and the largest gap between groups (a bias check)."""
    if not groups or all(g is None for g in groups):
        return {}
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault("(none)" if g is None else g, []).append(i)
    per_group = {}
    for g, idx in sorted(by_group.items()):
        per_group[g] = {"n": len(idx), name: round(float(per_row[idx].mean()), 4)}
    values = [float(per_row[idx].mean()) for idx in by_group.values()]
    return {"per_group": per_group, "group_gap": round(max(values) - min(values), 4)}


def multilabel_metrics(
    logits: torch.Tensor,  # [n, L]
    targets: torch.Tensor,  # [n, L] in {0, 1}
    labels: Sequence[str],
    thresholds: torch.Tensor,  # [L] probability thresholds
    groups: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Multi-label scores at the given thresholds: micro- and macro-F1 (scikit-learn's
    definitions: macro over the labels that occur in the truth or the predictions), subset
    accuracy (the whole label set right), Hamming loss, per-label precision/recall/F1 and the
    per-group subset accuracy. `loss` is binary cross-entropy summed over labels, mean over rows."""
    logits = logits.detach().float().cpu()[:, : len(labels)]
    truth = targets.detach().float().cpu() > 0.5
    n = len(truth)
    loss = (
        float(F.binary_cross_entropy_with_logits(logits, truth.float(), reduction="sum")) / n
        if n
        else float("nan")
    )
    pred = torch.sigmoid(logits) >= thresholds.float().cpu()
    tp = (pred & truth).sum(0).float()
    fp = (pred & ~truth).sum(0).float()
    fn = (~pred & truth).sum(0).float()
    f1 = torch.where(
        tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp)
    )
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    present = (tp + fp + fn) > 0
    micro_den = float(2 * tp.sum() + fp.sum() + fn.sum())
    exact = (pred == truth).all(dim=1).float()
    out: dict[str, Any] = {
        "loss": loss,
        "micro_f1": float(2 * tp.sum()) / micro_den if micro_den > 0 else 0.0,
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
        "accuracy": float(exact.mean()) if n else 0.0,  # subset accuracy
        "hamming_loss": float((pred != truth).float().mean()) if n else 0.0,
        "per_class": {
            label: {
                "precision": round(float(precision[j]), 4),
                "recall": round(float(recall[j]), 4),
                "f1": round(float(f1[j]), 4),
                "support": int(truth[:, j].sum()),
                "threshold": round(float(thresholds[j]), 4),
            }
            for j, label in enumerate(labels)
        },
    }
    out.update(_group_metrics(exact, groups, "accuracy"))
    return out
