"""Training data: parsing (JSON rows, JSONL, CSV), validation with row-level problems, splits."""

from __future__ import annotations

import csv
import io
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from loradock.adapters.core.text import JSONError, encoding_problem, parse_json

if TYPE_CHECKING:
    from loradock.adapters.tasks.base import Task

# Longer fields are refused row by row (max_text_chars), not by the csv module's 128 KiB default
# limit, which raises for the whole file.
csv.field_size_limit(64 * 1024 * 1024)

SMALL_DATASET_ROWS = 50  # below this, k-fold cross-validation picks the epoch count


@dataclass(frozen=True)
class Example:
    text: str
    label: str | float | tuple[str, ...]  # a class, a value, or a sorted set of labels
    group: str | None = None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, pointing at a row (1-based, as a person counts) and field."""

    row: int | None
    field: str | None
    message: str
    dataset: str = "training_data"

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "row": self.row,
            "field": self.field,
            "message": self.message,
        }


class DatasetError(ValueError):
    """The data cannot be trained on. `problems` says where and why (the first 50 of them)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)[:50]
        first = self.problems[0]
        where = f"{first.dataset} row {first.row}" if first.row is not None else first.dataset
        if first.field:
            where += f" field {first.field!r}"
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        super().__init__(f"{where}: {first.message}{more}")


@dataclass
class Dataset:
    """Validated examples of one task, plus what validation noticed (dropped rows, warnings)."""

    task: type[Task]
    examples: list[Example]
    labels: list[str]  # sorted class names (classification), [] for regression
    warnings: list[str] = field(default_factory=list)
    dropped_duplicates: int = 0
    dropped_conflicts: int = 0  # rows of texts given more than one label

    @property
    def has_groups(self) -> bool:
        return any(e.group is not None for e in self.examples)

    def class_counts(self) -> dict[str, int]:
        return dict(Counter(str(e.label) for e in self.examples))


# --- parsing -----------------------------------------------------------------------------------


def parse_jsonl(raw: bytes, dataset: str = "training_data") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    problems = []
    for i, line in enumerate(_decode(raw, dataset).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = parse_json(line)
        except JSONError as e:
            problems.append(Problem(i, None, f"not valid JSON: {e}", dataset))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(i, None, "each line must be a JSON object", dataset))
            continue
        rows.append(obj)
    if problems:
        raise DatasetError(problems)
    return rows


def parse_csv(raw: bytes, dataset: str = "training_data") -> list[dict[str, Any]]:
    """CSV with a header row naming at least `text` and `label` (or `labels`; optionally
    `group`)."""
    reader = csv.DictReader(io.StringIO(_decode(raw, dataset), newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in ("text", "label") if c not in header]
    if "labels" in header and "label" in missing:  # a multi-label file's usual column name
        missing.remove("label")
    if missing:
        raise DatasetError(
            [
                Problem(
                    1, None, f"CSV header must name text,label[,group]; missing {missing}", dataset
                )
            ]
        )
    reader.fieldnames = header
    rows = []
    try:
        for row in reader:
            rows.append({k: v for k, v in row.items() if k in ("text", "label", "labels", "group")})
    except csv.Error as e:  # an unbalanced quote, a field over the size limit
        line = reader.line_num
        raise DatasetError(
            [Problem(line, None, f"not valid CSV: {e} (check the quoting)", dataset)]
        ) from None
    return rows


def parse_parquet(
    raw: bytes,
    dataset: str = "training_data",
    columns: Sequence[str] = ("text", "label", "labels", "group"),
) -> list[dict[str, Any]]:
    """Rows of a Parquet file's `columns` that exist (a list column for multi-label labels)."""
    table = read_parquet(raw, dataset)
    present = [c for c in columns if c in table.column_names]
    if "text" not in present:
        raise DatasetError([Problem(None, None, "the Parquet file has no text column (it has "
                                    f"{table.column_names[:10]})", dataset)])  # fmt: skip
    rows: list[dict[str, Any]] = table.select(present).to_pylist()
    return rows


def read_parquet(raw: bytes, dataset: str) -> Any:
    """A pyarrow Table from Parquet bytes; DatasetError when it is not one."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a dependency of the server package
        raise DatasetError([Problem(None, None, "Parquet needs pyarrow on the server "
                                    "(pip install pyarrow)", dataset)]) from None  # fmt: skip
    try:
        return pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetError([Problem(None, None, f"not a readable Parquet file: {e}",
                                    dataset)]) from None  # fmt: skip


def parse_upload(raw: bytes, filename: str | None, dataset: str = "training_data") -> list[dict]:
    """JSONL, CSV or Parquet, told apart by the file name, else by the first bytes."""
    name = (filename or "").lower()
    if name.endswith(".parquet") or raw[:4] == b"PAR1":
        return parse_parquet(raw, dataset)
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return parse_jsonl(raw, dataset)
    if name.endswith(".csv"):
        return parse_csv(raw, dataset)
    head = raw.lstrip()[:1]
    return parse_jsonl(raw, dataset) if head == b"{" else parse_csv(raw, dataset)


def _decode(raw: bytes, dataset: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError([Problem(None, None, f"file is not UTF-8: {e}", dataset)]) from e


# --- validation --------------------------------------------------------------------------------


def validate_rows(
    rows: Sequence[Mapping[str, Any]],
    task: type[Task],
    *,
    max_rows: int,
    max_text_chars: int,
    dataset: str = "training_data",
    min_rows: int = 4,
    on_conflict: str = "drop",
    label_names: Mapping[str, str] | Sequence[str] | None = None,
) -> Dataset:
    """Check every row; raise DatasetError listing the problems, or return a clean Dataset.

    Exact duplicates (same text and label) are dropped with a warning. A text given different
    labels is ambiguous (its label, and validation on it, would be meaningless): with
    `on_conflict="drop"` (the default) all its rows are dropped with a warning naming them, with
    `"reject"` it is an error. Real data has such rows; one of them should not cost the dataset.
    """
    if len(rows) > max_rows:
        raise DatasetError(
            [Problem(None, None, f"{len(rows)} rows exceed the limit of {max_rows}", dataset)]
        )
    if len(rows) < min_rows:
        raise DatasetError(
            [Problem(None, None, f"{len(rows)} rows; at least {min_rows} are needed", dataset)]
        )
    problems: list[Problem] = []
    examples: list[tuple[int, Example]] = []
    names = _id_names(label_names, dataset)
    for i, row in enumerate(rows, start=1):
        ex = _check_row(i, row, task, max_text_chars, dataset, problems, names)
        if ex is not None:
            examples.append((i, ex))
    if problems:
        raise DatasetError(problems)

    # Group rows by text: exact duplicates (same label) are dropped; a text with conflicting
    # labels is dropped entirely (its label, and validation on it, would be meaningless) with a
    # warning naming the rows, or refused when on_conflict == "reject".
    by_text: dict[str, list[tuple[int, Example]]] = {}
    for i, ex in examples:
        by_text.setdefault(ex.text.strip(), []).append((i, ex))
    kept: list[Example] = []
    dropped = 0
    conflicts: list[str] = []
    conflict_rows = 0
    merged: list[int] = []  # rows per text whose different labels the task united
    for group in by_text.values():
        labels_seen = list(dict.fromkeys(ex.label for _, ex in group))
        if len(labels_seen) == 1:
            kept.append(group[0][1])
            dropped += len(group) - 1
            continue
        united = task.merge_labels(labels_seen)
        if united is not None:
            kept.append(replace(group[0][1], label=united))
            merged.append(len(group))
            continue
        numbers = [i for i, _ in group]
        where = f"rows {', '.join(map(str, numbers[:5]))}{' ...' if len(numbers) > 5 else ''}"
        if on_conflict == "reject":
            first = group[0]
            other = next((i, ex) for i, ex in group if ex.label != first[1].label)
            problems.append(
                Problem(
                    other[0], "label",
                    f"same text as row {first[0]} but label {other[1].label!r} instead of "
                    f"{first[1].label!r} (ambiguous; on_conflict='drop' would drop it)",
                    dataset,
                )
            )  # fmt: skip
            continue
        conflict_rows += len(group)
        conflicts.append(f"{where} ({' vs '.join(repr(lbl) for lbl in labels_seen[:4])})")
    if problems:
        raise DatasetError(problems)

    warnings = []
    if dropped:
        warnings.append(f"{dataset}: dropped {dropped} exact duplicate rows")
    if merged:
        warnings.append(
            f"{dataset}: {sum(merged)} rows of {len(merged)} texts gave a text different labels; "
            "each text's labels were united into one row"
        )
    if conflicts:
        shown = "; ".join(conflicts[:5]) + (
            f"; and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        )
        warnings.append(
            f"{dataset}: dropped {conflict_rows} rows of {len(conflicts)} texts with conflicting "
            f"labels: {shown}. Send on_conflict='reject' to refuse such data instead"
        )
    labels, task_warnings = task.check_labels(kept, dataset)
    warnings += task_warnings
    return Dataset(
        task=task,
        examples=kept,
        labels=labels,
        warnings=warnings,
        dropped_duplicates=dropped,
        dropped_conflicts=conflict_rows,
    )


def _id_names(
    label_names: Mapping[str, str] | Sequence[str] | None, dataset: str
) -> dict[str, str] | None:
    """{id as a string: name} from `label_names` (a list: ids are positions)."""
    if label_names is None:
        return None
    pairs = (
        list(label_names.items())
        if isinstance(label_names, Mapping)
        else [(str(i), name) for i, name in enumerate(label_names)]
    )
    names = {str(k).strip(): str(v).strip() for k, v in pairs}
    if not names or any(not v for v in names.values()) or len(set(names.values())) < len(names):
        raise DatasetError([Problem(None, "label_names", "label_names must give distinct, "
                                    "non-empty names", dataset)])  # fmt: skip
    return names


def _rename(value: str | float | tuple[str, ...], names: dict[str, str]) -> Any:
    """A parsed label with its ids replaced by names (names pass through); ValueError for a
    value that is neither. Numbers (regression targets) are left alone."""
    known = set(names.values())

    def one(v: str) -> str:
        if v in known:
            return v
        if v in names:
            return names[v]
        raise ValueError(f"label {v!r} is neither an id nor a name of label_names")

    if isinstance(value, tuple):
        return tuple(sorted({one(v) for v in value}))
    if isinstance(value, str):
        return one(value)
    return value


def _check_row(
    i: int,
    row: Mapping[str, Any],
    task: type[Task],
    max_text_chars: int,
    dataset: str,
    problems: list[Problem],
    names: dict[str, str] | None = None,
) -> Example | None:
    if not isinstance(row, Mapping):
        what = "a generation row" if task.custom_rows else "an object with text and label"
        problems.append(Problem(i, None, f"row must be {what}", dataset))
        return None
    before = len(problems)
    if task.custom_rows:
        parsed, found = task.check_row(row, max_text_chars)
        problems.extend(Problem(i, f, message, dataset) for f, message in found)
        if parsed is None:
            return None
        return Example(text=parsed[0], label=parsed[1])
    text = row.get("text")
    if not isinstance(text, str):
        problems.append(Problem(i, "text", "missing or not a string", dataset))
    elif not text.strip():
        problems.append(Problem(i, "text", "empty text", dataset))
    elif len(text) > max_text_chars:
        problems.append(
            Problem(
                i, "text", f"{len(text)} characters exceed the limit of {max_text_chars}", dataset
            )
        )
    elif (problem := encoding_problem(text)) is not None:
        problems.append(Problem(i, "text", problem, dataset))
    label = row.get("label")
    if label is None and "labels" in row:  # the usual name for a multi-label row's list
        label = row.get("labels")
    value: str | float | tuple[str, ...] | None = None
    empty = isinstance(label, str) and not label.strip()
    if label is None or (empty and not task.empty_label_ok):
        problems.append(Problem(i, "label", "missing label", dataset))
    else:
        try:
            value = task.parse_label(label)
            if names is not None:
                value = _rename(value, names)
        except ValueError as e:
            problems.append(Problem(i, "label", str(e), dataset))
    if isinstance(label, str) and (problem := encoding_problem(label)) is not None:
        problems.append(Problem(i, "label", problem, dataset))
    group = row.get("group")
    if group is not None and not isinstance(group, (str, int)):
        problems.append(Problem(i, "group", "must be a string", dataset))
    elif isinstance(group, str) and (problem := encoding_problem(group)) is not None:
        problems.append(Problem(i, "group", problem, dataset))
    if len(problems) > before:
        return None
    assert isinstance(text, str)
    assert value is not None
    return Example(text=text, label=value, group=None if group in (None, "") else str(group))


def check_validation_labels(train: Dataset, val: Dataset) -> None:
    """Validation rows must be answerable by the trained model (e.g. known classes)."""
    problems = train.task.validation_problems(train, val)
    if problems:
        raise DatasetError(problems)


def remove_leakage(train: Dataset, val: Dataset) -> int:
    """Drop training rows whose text is also in validation (it would inflate validation scores)."""
    val_texts = {e.text.strip() for e in val.examples}
    before = len(train.examples)
    train.examples = [e for e in train.examples if e.text.strip() not in val_texts]
    removed = before - len(train.examples)
    if removed:
        train.warnings.append(
            f"dropped {removed} training rows that also appear in validation_data"
        )
    return removed


# --- splits ------------------------------------------------------------------------------------


def stratified_split(
    examples: Sequence[Example], task: type[Task], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of each stratum (`task.strata`: a class, or a quantile bin of a
    regression label), at least one row per stratum of two or more, and one left to train."""
    rng = random.Random(seed)
    strata: dict[str, list[Example]] = defaultdict(list)
    keys = task.strata(examples)
    for ex, key in zip(examples, keys, strict=True):
        strata[key].append(ex)
    train: list[Example] = []
    val: list[Example] = []
    for key in sorted(strata):
        rows = strata[key][:]
        rng.shuffle(rows)
        n_val = max(1, round(len(rows) * fraction)) if len(rows) >= 2 else 0
        n_val = min(n_val, len(rows) - 1)
        val.extend(rows[:n_val])
        train.extend(rows[n_val:])
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def stratified_fold_ids(strata: Sequence[str], folds: int, seed: int) -> list[int]:
    """A fold number per row: each stratum shuffled and dealt round-robin over the folds."""
    rng = random.Random(seed)
    by_stratum: dict[str, list[int]] = {}
    for i, key in enumerate(strata):
        by_stratum.setdefault(key, []).append(i)
    fold_of = [0] * len(strata)
    offset = 0
    for key in sorted(by_stratum):
        rows = by_stratum[key]
        rng.shuffle(rows)
        for j, i in enumerate(rows):
            fold_of[i] = (offset + j) % folds
        offset += len(rows)
    return fold_of


def stratified_folds(
    examples: Sequence[Example], task: type[Task], k: int, seed: int
) -> list[tuple[list[Example], list[Example]]]:
    """k (train, validation) folds, each stratum spread round-robin over the folds."""
    fold_of = stratified_fold_ids(task.strata(examples), k, seed)
    return [
        (
            [ex for ex, f in zip(examples, fold_of, strict=True) if f != i],
            [ex for ex, f in zip(examples, fold_of, strict=True) if f == i],
        )
        for i in range(k)
    ]


def check_split_feasible(ds: Dataset) -> None:
    """The dataset can be split into training and validation parts (e.g. two rows per class)."""
    problems = ds.task.split_problems(ds)
    if problems:
        raise DatasetError(problems)
