"""The handlers of the `loradock` commands: read inputs, call the client, print the answer."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loradock_client import render
from loradock_client._calls import write_file
from loradock_client.batching import BatchProgress
from loradock_client.client import Client
from loradock_client.models import JobEvent, TrainingResult
from loradock_client.progress import ProgressDisplay

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
Handler = Callable[[Client, argparse.Namespace], int]


class UsageError(Exception):
    """A wrong argument or unreadable input file: exit 2 with the message."""


# --- output ---------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """JSON-ready form of models, lists of models and dicts."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def emit(args: argparse.Namespace, value: Any, text: str | Callable[[], str]) -> None:
    """Print `value` as JSON with --json, else the human text."""
    if args.json:
        print(json.dumps(plain(value), indent=2, default=str))
    else:
        print(text() if callable(text) else text)


# --- inputs ---------------------------------------------------------------------------------------


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows with a "text" from a file ('-' = stdin): JSONL rows with "text" (other fields kept),
    a CSV or Parquet file with a text column, or one text per line."""
    if Path(path).suffix.lower() == ".parquet":
        return _parquet_rows(path)
    try:
        content = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(content, path)
        for n, row in enumerate(rows, 1):
            if "text" not in row:
                raise UsageError(f"{path}: row {n} has no 'text'")
        return rows
    if suffix == ".csv":
        table: list[dict[str, Any]] = list(csv.DictReader(io.StringIO(content)))
        if table and "text" not in table[0]:
            raise UsageError(f"{path}: a CSV needs a 'text' column")
        return table
    return [{"text": line} for line in content.splitlines() if line.strip()]


def _parquet_rows(path: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    if "text" not in table.column_names:
        raise UsageError(f"{path}: a Parquet file needs a 'text' column")
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def read_labelled(path: str) -> list[dict[str, Any]]:
    """Rows {"text","label"} (or "labels", a multi-label list) from a JSONL or CSV file."""
    try:
        content = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    if Path(path).suffix.lower() == ".csv":
        rows: list[dict[str, Any]] = list(csv.DictReader(io.StringIO(content)))
    else:
        rows = _jsonl_rows(content, path)
    for n, row in enumerate(rows, 1):
        if "text" not in row or ("label" not in row and "labels" not in row):
            raise UsageError(f"{path}: row {n} needs 'text' and 'label' (or 'labels')")
    return rows


def _jsonl_rows(content: str, path: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: line {n} is not JSON: {e.msg}") from e
        if not isinstance(row, dict) or "text" not in row:
            raise UsageError(f'{path}: line {n} is not an object with "text"')
        rows.append(row)
    return rows


def existing_file(path: str) -> str:
    if not Path(path).is_file():
        raise UsageError(f"no such file: {path}")
    return path


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """--hyperparameters JSON, then each --hp key=value (values read as JSON when they parse)."""
    hp: dict[str, Any] = {}
    if args.hyperparameters:
        try:
            hp = json.loads(args.hyperparameters)
        except json.JSONDecodeError as e:
            raise UsageError(f"--hyperparameters is not JSON: {e.msg}") from e
        if not isinstance(hp, dict):
            raise UsageError("--hyperparameters must be a JSON object")
    for item in args.hp or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--hp takes key=value, got {item!r}")
        try:
            hp[key] = json.loads(value)
        except json.JSONDecodeError:
            hp[key] = value
    return hp


# --- training and jobs ----------------------------------------------------------------------------


class EpochLog:
    """Epoch lines for people; a separator where the epoch count starts again (the next
    cross-validation fold, or the final fit on every row after the folds)."""

    def __init__(self, display: ProgressDisplay) -> None:
        self.display = display
        self.last: float | None = None
        self.run = 1
        self.folds: int | None = None
        self.tag: int | str | None = None

    def __call__(self, event: JobEvent) -> None:
        if event.event == "progress" and event.data.get("folds"):
            self.folds = int(event.data["folds"])
        if event.event != "epoch":
            return
        epoch = event.data.get("epoch")
        # Servers tag each epoch with its cross-validation fold or the final fit; for untagged
        # epochs (older servers) a restarting epoch count marks the next run.
        tag = "final" if event.data.get("final_fit") else event.data.get("fold")
        what = None
        if tag is not None and tag != self.tag:
            what = (
                "final fit on every row"
                if tag == "final"
                else f"cross-validation fold {tag}/{self.folds or '?'}"
            )
        elif (
            tag is None
            and self.last is not None
            and isinstance(epoch, int | float)
            and epoch <= self.last
        ):
            self.run += 1
            if self.folds and self.folds > 1:
                what = (
                    f"cross-validation fold {self.run}/{self.folds}"
                    if self.run <= self.folds
                    else "final fit on every row"
                )
            else:
                what = "training restarted"
        if what is not None:
            self.display.echo(f"-- {what} --", sys.stdout)
        self.tag = tag
        self.last = epoch if isinstance(epoch, int | float) else self.last
        self.display.echo(render.epoch_line(event.data), sys.stdout)


def follow(
    client: Client, args: argparse.Namespace, job_id: str, *, ndjson: bool = False
) -> TrainingResult:
    """Watch a job: epoch lines on stdout and a bar on stderr (when a terminal); with --json
    nothing, or with `ndjson` every event as one JSON line."""
    display = ProgressDisplay(echo_epochs=False, enabled=False if args.json else None)
    epochs = EpochLog(display)

    def on_event(event: JobEvent) -> None:
        if args.json:
            if ndjson:
                line = json.dumps({"event": event.event, "data": event.data}, default=str)
                print(line, flush=True)
            return
        epochs(event)
        if event.event == "status" and event.data.get("status") in ("queued", "running"):
            display.echo(f"job {job_id}: {event.data['status']}", sys.stdout)

    job = client.jobs.watch(job_id, progress=display, on_event=on_event)
    return TrainingResult(adapter=client.adapters.get(job.adapter_id), job=job)


def report_training(args: argparse.Namespace, result: TrainingResult) -> int:
    emit(args, result, result.summary)
    return EXIT_OK if result.job.status == "succeeded" else EXIT_ERROR


def train(client: Client, args: argparse.Namespace, adapter: str | None) -> int:
    kw: dict[str, Any] = {
        "training_file": existing_file(args.file),
        "validation_file": existing_file(args.validation_file) if args.validation_file else None,
        "validation_split": args.validation_split,
        "hyperparameters": hyperparameters(args),
        "promote": args.promote,
        "wait": False,
    }
    if adapter is None:
        started = client.adapters.create(args.name, args.task, **kw)
    else:
        started = client.adapters.retrain(adapter, **kw)
    if args.no_wait:
        job = started.job
        text = f"queued job {job.id} for {started.adapter.name} version {job.version}; follow it"
        emit(args, started, f"{text} with: loradock jobs watch {job.id}")
        return EXIT_OK
    if not args.json:
        print(f"training {started.adapter.name} version {started.job.version} "
              f"(job {started.job.id})", flush=True)  # fmt: skip
    return report_training(args, follow(client, args, started.job.id))


def cmd_adapters_create(client: Client, args: argparse.Namespace) -> int:
    return train(client, args, None)


def cmd_adapters_retrain(client: Client, args: argparse.Namespace) -> int:
    return train(client, args, args.adapter)


def cmd_adapters_list(client: Client, args: argparse.Namespace) -> int:
    adapters = client.adapters.list(view="full" if args.full else "summary")
    emit(args, adapters, lambda: render.adapters_table(adapters) if adapters else "no adapters")
    return EXIT_OK


def cmd_adapters_show(client: Client, args: argparse.Namespace) -> int:
    adapter = client.adapters.get(args.adapter)
    emit(args, adapter, lambda: render.adapter_detail(adapter))
    return EXIT_OK


def cmd_adapters_delete(client: Client, args: argparse.Namespace) -> int:
    client.adapters.delete(args.adapter)
    emit(args, {"deleted": args.adapter}, f"deleted {args.adapter}")
    return EXIT_OK


def cmd_adapters_download(client: Client, args: argparse.Namespace) -> int:
    path = client.adapters.download(args.adapter, args.version, args.output)
    emit(args, {"path": str(path)}, f"saved {path}")
    return EXIT_OK


def cmd_adapters_export(client: Client, args: argparse.Namespace) -> int:
    path = client.adapters.export(args.adapter, args.version, args.output, format=args.format)
    emit(args, {"path": str(path)}, f"saved {path}")
    return EXIT_OK


def cmd_adapters_import(client: Client, args: argparse.Namespace) -> int:
    adapter = client.adapters.import_(existing_file(args.file), name=args.name)
    emit(args, adapter, lambda: render.adapter_detail(adapter))
    return EXIT_OK


def cmd_predict(client: Client, args: argparse.Namespace) -> int:
    rows = [{"text": t} for t in args.texts] + (read_rows(args.file) if args.file else [])
    if not rows:
        raise UsageError("give texts as arguments or --file FILE")
    if args.batch_size < 1 or args.concurrency < 1:
        raise UsageError("--batch-size and --concurrency must be at least 1")
    if args.server_side:
        if not args.output:
            raise UsageError("--server-side needs --output FILE")
        return predict_on_server(client, args, rows, Path(args.output))
    if args.output:
        return predict_to_file(client, args, rows, Path(args.output))
    texts = [str(r["text"]) for r in rows]
    result = client.predict(
        args.adapter, texts, version=args.version, batch_size=args.batch_size,
        concurrency=args.concurrency,
    )  # fmt: skip
    emit(args, result, lambda: render.predictions_table(result, texts))
    return EXIT_OK


def predict_to_file(
    client: Client, args: argparse.Namespace, rows: list[dict[str, Any]], target: Path
) -> int:
    """Every row with its prediction as JSONL: the input row's fields, then `prediction` and
    `version`. Written to `<output>.partial` and renamed when complete, so a failed run never
    leaves a file that looks finished; progress goes to stderr."""
    partial = target.with_name(target.name + ".partial")
    total = len(rows)
    last = [0.0]

    def progress(p: BatchProgress) -> None:
        if args.quiet or (p.seconds - last[0] < 1.0 and p.done < total):
            return
        last[0] = p.seconds
        print(f"\rpredicted {p.done:,}/{total:,} texts ({p.per_second:,.0f}/s)", end="",
              file=sys.stderr, flush=True)  # fmt: skip

    written = 0
    try:
        with partial.open("w", encoding="utf-8") as out:
            answers = client.adapters.predict_iter(
                args.adapter, (str(r["text"]) for r in rows), args.version,
                batch_size=args.batch_size, concurrency=args.concurrency, total=total,
                on_progress=progress,
            )  # fmt: skip
            for row, (_, prediction, version) in zip(rows, answers, strict=True):
                record = {**row, "prediction": plain(prediction), "version": version}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
    except BaseException:
        if not args.quiet:
            print(file=sys.stderr)
        print(f"stopped after {written:,} of {total:,} rows; what was written is in {partial}",
              file=sys.stderr)  # fmt: skip
        raise
    partial.replace(target)
    if not args.quiet:
        print(file=sys.stderr)
    summary = {"output": str(target), "rows": written}
    emit(args, summary, f"wrote {written:,} predictions to {target}")
    return EXIT_OK


def predict_on_server(
    client: Client, args: argparse.Namespace, rows: list[dict[str, Any]], target: Path
) -> int:
    """The rows as one server-side batch job: submitted, followed (progress on stderr), and its
    results written as JSONL like `--output` writes them (rows the server could not predict carry
    `error`). The job runs on even if this command is stopped: `loradock jobs results JOB`."""
    items = [{"text": str(r["text"]), "id": i} for i, r in enumerate(rows)]
    submitted = client.adapters.batch(args.adapter, items, version=args.version)
    for warning in submitted.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(f"job {submitted.job.id}: {submitted.rows:,} rows on version {submitted.version}",
              file=sys.stderr)  # fmt: skip

    def progress(job: Any) -> None:
        p = job.progress
        if not args.quiet and p.rows:
            rate = p.rows_per_second or 0
            line = f"predicted {p.rows_done or 0:,}/{p.rows:,} texts ({rate:,.0f}/s)"
            print(f"\r{line}", end="", file=sys.stderr, flush=True)

    results = client.jobs.wait_results(submitted.job.id, on_progress=progress)
    if not args.quiet:
        print(file=sys.stderr)
    partial = target.with_name(target.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for line in results:
            record = {**rows[line["id"]]}
            record.update({k: line[k] for k in ("prediction", "error") if k in line})
            record["version"] = submitted.version
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(target)
    emit(args, {"output": str(target), "rows": len(results), "job": submitted.job.id},
         f"wrote {len(results):,} predictions to {target} (job {submitted.job.id})")  # fmt: skip
    return EXIT_OK


def cmd_jobs_results(client: Client, args: argparse.Namespace) -> int:
    lines = client.jobs.results(args.job)
    target = Path(args.output)
    write_file(target, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode())
    emit(
        args, {"output": str(target), "rows": len(lines)}, f"wrote {len(lines):,} rows to {target}"
    )
    return EXIT_OK


def cmd_feedback(client: Client, args: argparse.Namespace) -> int:
    items: list[Any] = read_labelled(args.file) if args.file else []
    items += [{"text": t, "label": label} for t, label in args.item or []]
    if not items:
        raise UsageError("give --file FILE or --item TEXT LABEL")
    result = client.adapters.feedback(args.adapter, items)
    emit(args, result, f"accepted {result.accepted} labelled items (version {result.version})")
    return EXIT_OK


def cmd_jobs_list(client: Client, args: argparse.Namespace) -> int:
    jobs = client.jobs.list(adapter=args.adapter, view="full" if args.full else "summary")
    emit(args, jobs, lambda: render.jobs_table(jobs) if jobs else "no jobs")
    return EXIT_OK


def cmd_jobs_show(client: Client, args: argparse.Namespace) -> int:
    job = client.jobs.get(args.job)
    emit(args, job, lambda: render.job_detail(job))
    return EXIT_OK


def cmd_jobs_watch(client: Client, args: argparse.Namespace) -> int:
    result = follow(client, args, args.job, ndjson=True)
    if args.json:
        return EXIT_OK if result.job.status == "succeeded" else EXIT_ERROR
    return report_training(args, result)


def cmd_jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.jobs.cancel(args.job)
    emit(args, job, f"job {job.id}: {job.status}, cancel requested")
    return EXIT_OK


def cmd_monitoring_show(client: Client, args: argparse.Namespace) -> int:
    report = client.adapters.monitoring(args.adapter)
    emit(args, report, lambda: render.monitoring_report(report))
    return EXIT_OK


def cmd_versions_show(client: Client, args: argparse.Namespace) -> int:
    version = client.versions.get(args.adapter, args.version)
    emit(args, version, lambda: render.version_detail(args.adapter, version))
    return EXIT_OK


def cmd_versions_promote(client: Client, args: argparse.Namespace) -> int:
    adapter = client.versions.promote(args.adapter, args.version)
    emit(args, adapter, f"{adapter.name}: version {adapter.live_version} is live")
    return EXIT_OK


def cmd_tenants_create(client: Client, args: argparse.Namespace) -> int:
    tenant = client.tenants.create(args.name)
    emit(args, tenant, f"created tenant {tenant.name} ({tenant.id})")
    return EXIT_OK


def cmd_tenants_list(client: Client, args: argparse.Namespace) -> int:
    tenants = client.tenants.list()
    emit(args, tenants, lambda: render.tenants_table(tenants))
    return EXIT_OK


def cmd_keys_create(client: Client, args: argparse.Namespace) -> int:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    key = client.keys.create(args.tenant_id, scopes)
    emit(args, key, f"key {key.id} ({', '.join(key.scopes)}); shown once, keep it:\n{key.key}")
    return EXIT_OK


def cmd_keys_revoke(client: Client, args: argparse.Namespace) -> int:
    client.keys.revoke(args.key_id)
    emit(args, {"revoked": args.key_id}, f"revoked {args.key_id}")
    return EXIT_OK
