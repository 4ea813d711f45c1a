"""Plain-text rendering of API objects for people: summaries, tables, the monitoring report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from loradock_client.textplot import line_chart

if TYPE_CHECKING:
    from loradock_client.models import (
        Adapter,
        Job,
        MonitoringReport,
        PredictionResult,
        Tenant,
        TrainingResult,
        Version,
    )

METRIC_KEYS = ("val_loss", "val_accuracy", "val_macro_f1", "val_mse", "val_mae", "val_r2")
EPOCH_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_macro_f1")
SHORT = {"val_accuracy": "val_acc", "val_macro_f1": "val_f1"}


def num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left-aligned text table; numbers are right-aligned."""
    cells = [[num(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    numeric = [
        all(not isinstance(row[i], str) for row in rows) if rows else False
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def epoch_line(record: Mapping[str, Any]) -> str:
    parts = [f"epoch {num(record.get('epoch'))}"]
    for key in EPOCH_KEYS:
        if record.get(key) is not None:
            parts.append(f"{SHORT.get(key, key)} {num(record[key])}")
    if record.get("best"):
        parts.append("*best")
    return "  ".join(parts)


def metrics_vs_baseline(version: Version) -> str:
    m = version.metrics.model_dump(exclude_none=True)
    b = version.baseline.model_dump(exclude_none=True)
    keys = [k for k in METRIC_KEYS if k in m or k in b]
    if not keys:
        return "(no validation metrics)"
    return table(
        ["metric", f"v{version.version}", "linear probe"], [[k, m.get(k), b.get(k)] for k in keys]
    )


def training_summary(result: TrainingResult) -> str:
    """Epochs run, stop reason, best epoch, validation metrics vs the linear-probe baseline."""
    adapter, job = result.adapter, result.job
    ver = result.version
    lines = [f"adapter {adapter.name} ({adapter.id}) version {job.version}: job {job.status}"]
    if job.error:
        lines.append(f"error: {job.error}")
    if ver is not None:
        m = ver.metrics
        stop = m.stop_reason or job.stop_reason or "-"
        lines.append(
            f"epochs run: {num(m.epochs_run)}, stop reason: {stop}, best epoch: {num(m.best_epoch)}"
        )
        winner = ver.report.get("winner_reason")
        if winner:
            lines.append(f"served: {ver.report.get('winner', '-')} ({winner})")
        promotion = ver.report.get("promotion") or {}
        live = "live" if adapter.live_version == ver.version else "not live"
        reason = f" ({promotion['reason']})" if promotion.get("reason") else ""
        lines.append(f"status: {ver.status}, {live}{reason}")
        if ver.status == "ready":
            lines += ["", metrics_vs_baseline(ver)]
        for warning in ver.report.get("warnings") or []:
            lines.append(f"warning: {warning}")
    return "\n".join(lines)


def adapters_table(adapters: Sequence[Adapter]) -> str:
    rows = []
    for a in adapters:
        live = a.version()
        if a.version_count is not None:  # the summary view
            count, f1 = a.version_count, (a.live_metrics or {}).get("val_macro_f1")
        else:
            count, f1 = len(a.versions), live.metrics.val_macro_f1 if live else None
        rows.append([a.name, a.id, a.task, a.status, str(a.live_version or "-"), str(count), f1])
    return table(["name", "id", "task", "status", "live", "versions", "val_f1"], rows)


def adapter_detail(adapter: Adapter) -> str:
    lines = [
        f"adapter {adapter.name} ({adapter.id})",
        f"task: {adapter.task}, status: {adapter.status}, live version: "
        f"{adapter.live_version or '-'}",
    ]
    if adapter.labels:
        lines.append(f"labels: {', '.join(adapter.labels)}")
    rows = []
    for v in adapter.versions:
        m = v.metrics
        rows.append(
            [
                str(v.version) + (" (live)" if v.live else ""),
                v.status,
                m.stop_reason or "-",
                m.best_epoch,
                m.val_loss,
                m.val_macro_f1,
                v.baseline.val_macro_f1,
            ]
        )
    if rows:
        headers = ["version", "status", "stop", "best_epoch", "val_loss", "val_f1", "probe_f1"]
        lines += ["", table(headers, rows)]
    return "\n".join(lines)


def version_detail(adapter: str, version: Version) -> str:
    m = version.metrics
    lines = [
        f"adapter {adapter} version {version.version}: {version.status}"
        + (" (live)" if version.live else ""),
        f"epochs run: {num(m.epochs_run)}, stop reason: {m.stop_reason or '-'}, "
        f"best epoch: {num(m.best_epoch)}",
        "",
        metrics_vs_baseline(version),
    ]
    if version.history:
        lines += ["", *loss_chart([r.model_dump() for r in version.history])]
    return "\n".join(lines)


def predictions_table(result: PredictionResult, texts: Sequence[str]) -> str:
    if any(p.value is not None for p in result.predictions):
        rows = [[clip(t), p.value] for t, p in zip(texts, result.predictions, strict=False)]
        return table(["text", "value"], rows)
    rows = [
        [clip(t), p.label or "-", p.score] for t, p in zip(texts, result.predictions, strict=False)
    ]
    return table(["text", "label", "score"], rows)


def jobs_table(jobs: Sequence[Job]) -> str:
    rows = []
    for j in jobs:
        p = j.progress
        frac = p.fraction
        rows.append(
            [
                j.id,
                j.adapter_id,
                str(j.version),
                j.status,
                f"{frac:.0%}" if frac is not None else "-",
                j.stop_reason or "-",
                str(j.created_at or "-")[:19],
            ]
        )
    return table(["id", "adapter", "version", "status", "progress", "stop", "created"], rows)


def job_detail(job: Job) -> str:
    lines = [
        f"job {job.id}: {job.status} (adapter {job.adapter_id} version {job.version})",
        f"stop reason: {job.stop_reason or '-'}, attempts: {job.attempts}",
    ]
    if job.error:
        lines.append(f"error: {job.error}")
    lines += [epoch_line(r.model_dump()) for r in job.history]
    return "\n".join(lines)


def tenants_table(tenants: Sequence[Tenant]) -> str:
    return table(
        ["id", "name", "created"], [[t.id, t.name, str(t.created_at or "-")[:19]] for t in tenants]
    )


def loss_chart(history: Sequence[Mapping[str, Any]], height: int = 10) -> list[str]:
    """Train and validation loss per validation, drawn as text."""
    series = {
        key: [r.get(key) for r in history]
        for key in ("train_loss", "val_loss")
        if any(r.get(key) is not None for r in history)
    }
    if not series:
        return ["(no loss history)"]
    xs = [r.get("epoch") for r in history]
    return line_chart(series, height=height, x_labels=(num(xs[0]), num(xs[-1])), x_name="epoch")


def _drift_rows(signals: Mapping[str, Any], drifted: Sequence[str]) -> list[list[Any]]:
    rows = []
    for name, sig in signals.items():
        if "psi" in sig:
            score = f"PSI {sig['psi']:.3f}"
        elif "p_value" in sig:
            score = f"MMD^2 {sig.get('mmd2', 0):.4g}, p = {sig['p_value']:.3f}"
        else:
            score = "-"
        rows.append([name, score, "DRIFTED" if name in drifted else "ok"])
    return rows


def monitoring_report(report: MonitoringReport) -> str:
    training = report.training
    lines = [f"adapter {report.name} ({report.adapter}), live version {report.live_version or '-'}"]
    metrics, baseline = training.get("metrics") or {}, training.get("baseline") or {}
    over = report.overfitting
    lines += ["", "Training"]
    if metrics:
        lines.append(
            f"  epochs run {num(metrics.get('epochs_run'))}, stop reason "
            f"{metrics.get('stop_reason') or '-'}, best epoch {num(metrics.get('best_epoch'))}"
        )
        keys = [k for k in METRIC_KEYS if k in metrics or k in baseline]
        rows = [[k, metrics.get(k), baseline.get(k)] for k in keys]
        lines += [
            "  " + ln for ln in table(["metric", "served", "linear probe"], rows).splitlines()
        ]
    if over.get("winner_reason"):
        lines.append(f"  served: {over.get('winner')} ({over['winner_reason']})")
    history = training.get("history") or []
    if history:
        lines += ["", "Loss per epoch"]
        lines += ["  " + ln for ln in loss_chart(history)]
    gap = over.get("generalization_gap")
    lines += ["", f"Overfitting: {over.get('verdict', '-')}"]
    if gap is not None:
        lines[-1] += f" (generalization gap {num(gap)})"
    drift = report.drift
    signals = drift.get("signals") or {}
    status = drift.get("status") or ("scored" if signals else "not scored yet")
    lines += ["", f"Drift: {status}, {drift.get('window_rows', 0)} predictions in the window"]
    if signals:
        rows = _drift_rows(signals, drift.get("drifted_signals") or [])
        lines += ["  " + ln for ln in table(["signal", "score", "verdict"], rows).splitlines()]
    live = report.live_accuracy
    if live.get("items"):
        text = f"Live accuracy: {num(live.get('accuracy'))} on {live['items']} labelled items"
        if live.get("validation_accuracy") is not None:
            text += f" (validation {num(live['validation_accuracy'])}, gap {num(live.get('gap'))})"
        lines += ["", text]
    else:
        lines += ["", "Live accuracy: no feedback yet"]
    lines += ["", "Flags:" if report.flags else "Flags: none"]
    lines += [f"  - {flag}" for flag in report.flags]
    return "\n".join(lines)
