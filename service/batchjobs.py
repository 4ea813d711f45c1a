"""Server-side batch prediction: a file of texts becomes a job whose result is a predictions file.

`POST /v1/adapters/{adapter}/batch` stores the inputs (as a training job stores its dataset) and
queues a job of kind `predict` on the version live at that moment (or the one asked for): the
version is pinned, so a promotion while it runs changes nothing. The job runner works through the
rows in length-sorted chunks on the same base and adapter slots as online traffic, yielding to
online requests between chunks (the priority gate), writes progress (`rows_done` of `rows`,
rows per second) and checks for cancellation as it goes, and publishes `predictions.jsonl`
atomically when every row is done: one line per input row, in input order, `{"row", "id"?,
"prediction"}` or `{"row", "id"?, "error"}` for a row that could not be predicted (empty, too long,
not text): a stray bad line costs that line, not the batch. Restarted or re-claimed jobs run again
from the start; the results stay in the store until the job (or its adapter) is deleted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loradock.adapters.core.text import JSONError, encoding_problem, parse_json
from loradock.adapters.training.data import DatasetError, parse_parquet

log = logging.getLogger(__name__)

KIND = "predict"
OUTPUT_FILE = "predictions.jsonl"
CHUNK_ROWS = 64  # rows per forward pass of a batch job (length-sorted, so padding stays small)
PROGRESS_SECONDS = 1.0


def batch_key(tenant_id: str, adapter_id: str, job_id: str) -> str:
    """Where a batch job's predictions are published: `<tenant>/<adapter>/batches/<job>`."""
    return f"{tenant_id}/{adapter_id}/batches/{job_id}"


class BatchInputError(ValueError):
    """The upload as a whole cannot be read (not one usable row, too many rows, not UTF-8)."""


@dataclass
class BatchInput:
    """Parsed rows: per row the text or the reason it cannot be predicted, and an optional id
    the caller gave it (echoed in the output, to join on)."""

    texts: list[str | None]
    errors: dict[int, str]  # 0-based row -> reason
    ids: dict[int, Any]

    def encode(self) -> bytes:
        lines = []
        for i, text in enumerate(self.texts):
            row: dict[str, Any] = {"text": text} if text is not None else {"error": self.errors[i]}
            if i in self.ids:
                row["id"] = self.ids[i]
            lines.append(json.dumps(row, ensure_ascii=False))
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes) -> BatchInput:
        texts: list[str | None] = []
        errors: dict[int, str] = {}
        ids: dict[int, Any] = {}
        for i, line in enumerate(raw.decode().splitlines()):
            row = json.loads(line)
            texts.append(row.get("text"))
            if "error" in row:
                errors[i] = row["error"]
            if "id" in row:
                ids[i] = row["id"]
        return cls(texts, errors, ids)

    @property
    def usable(self) -> int:
        return sum(1 for t in self.texts if t is not None)


def parse_inputs(
    raw: bytes | list[Any], filename: str | None, *, max_rows: int, max_text_chars: int
) -> BatchInput:
    """Rows from a JSON list (`inputs`), or an uploaded file: JSONL (a string or an object with
    `text` and optionally `id` per line), CSV or Parquet with a `text` column (and optionally
    `id`), or plain text (one text per line). Bad rows are kept as errors in their place."""
    items: list[Any]
    if isinstance(raw, list):
        items = raw
    elif (filename or "").lower().endswith(".parquet") or raw[:4] == b"PAR1":
        try:
            items = parse_parquet(raw, "input_file", columns=("text", "id"))
        except DatasetError as e:
            raise BatchInputError(str(e)) from None
    else:
        try:
            content = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BatchInputError(f"the file is not UTF-8: {e}") from None
        items = _file_rows(content, (filename or "").lower())
    if len(items) > max_rows:
        raise BatchInputError(
            f"{len(items)} rows exceed the limit of {max_rows} per batch job (setting "
            "LORADOCK_MAX_BATCH_JOB_ROWS); split the file"
        )
    out = BatchInput([], {}, {})
    for i, item in enumerate(items):
        text: Any = item
        if isinstance(item, dict):
            text = item.get("text")
            if (
                "id" in item
                and isinstance(item["id"], str | int | float)
                and not isinstance(item["id"], bool)
            ):
                out.ids[i] = item["id"]
        problem = item.reason if isinstance(item, _Bad) else _problem(text, max_text_chars)
        if problem is None:
            out.texts.append(text)
        else:
            out.texts.append(None)
            out.errors[i] = problem
    if not out.texts:
        raise BatchInputError("no rows: the batch is empty")
    if out.usable == 0:
        first = min(out.errors)
        raise BatchInputError(f"no row can be predicted (row {first + 1}: {out.errors[first]})")
    return out


@dataclass(frozen=True)
class _Bad:
    reason: str


def _file_rows(content: str, name: str) -> list[Any]:
    if name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(content, newline=""))
        fields = [f.strip() for f in reader.fieldnames or []]
        if "text" not in fields:
            raise BatchInputError(f"the CSV header must name a text column; it has {fields[:10]}")
        reader.fieldnames = fields
        try:
            return [{k: v for k, v in r.items() if k in ("text", "id")} for r in reader]
        except csv.Error as e:
            raise BatchInputError(f"not valid CSV at line {reader.line_num}: {e}") from None
    lines = [line for line in content.splitlines() if line.strip()]
    if name.endswith(".txt"):
        return lines
    looks_json = name.endswith((".jsonl", ".ndjson", ".json")) or content.lstrip()[:1] in '{"'
    if not looks_json:
        return lines
    rows: list[Any] = []
    for line in lines:
        try:
            rows.append(parse_json(line))
        except JSONError as e:
            rows.append(_Bad(f"not valid JSON: {e}"))
    return rows


def _problem(text: Any, max_chars: int) -> str | None:
    if not isinstance(text, str):
        return "no text (a string, or an object with a text field)"
    if not text.strip():
        return "empty text"
    if len(text) > max_chars:
        return f"{len(text)} characters exceed the limit of {max_chars} (LORADOCK_MAX_TEXT_CHARS)"
    return encoding_problem(text)


# --- running -----------------------------------------------------------------------------------


class Stopped(Exception):
    """The job was cancelled, or the server is shutting down (then it is re-queued)."""


def predict_all(
    batch: BatchInput,
    run: Callable[[Sequence[str]], list[dict[str, Any]]],
    *,
    on_progress: Callable[[int, int], None],
    should_stop: Callable[[], bool],
    between: Callable[[], None],
    chunk_rows: int = CHUNK_ROWS,
) -> list[dict[str, Any] | None]:
    """Every usable row through `run` (texts -> predictions), in length-sorted chunks; returns a
    prediction per row (None for rows with an error). `between` runs before each chunk (yield to
    online traffic); `should_stop` raises Stopped when true."""
    order = sorted((i for i, t in enumerate(batch.texts) if t is not None),
                   key=lambda i: len(batch.texts[i] or ""))  # fmt: skip
    results: list[dict[str, Any] | None] = [None] * len(batch.texts)
    done = 0
    for s in range(0, len(order), chunk_rows):
        if should_stop():
            raise Stopped()
        between()
        idx = order[s : s + chunk_rows]
        for i, prediction in zip(idx, run([batch.texts[i] or "" for i in idx]), strict=True):
            results[i] = prediction
        done += len(idx)
        on_progress(done, len(order))
    return results


def encode_results(batch: BatchInput, results: Sequence[dict[str, Any] | None]) -> bytes:
    lines = []
    for i, prediction in enumerate(results):
        row: dict[str, Any] = {"row": i + 1}
        if i in batch.ids:
            row["id"] = batch.ids[i]
        if prediction is not None:
            row["prediction"] = prediction
        else:
            row["error"] = batch.errors.get(i, "not predicted")
        lines.append(json.dumps(row, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


class Throughput:
    """Rows per second since the start, for the job's progress."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def rate(self, done: int) -> float:
        elapsed = time.monotonic() - self.started
        return round(done / elapsed, 1) if elapsed > 0 else 0.0
