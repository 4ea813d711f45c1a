"""Uploaded training data, parsed and validated away from serving.

A 50,000-row upload is seconds of pure-Python work (JSON/CSV parsing, the request schema, row
checks, encoding the stored dataset). Run on the event loop it would stall every prediction; run
in a thread of the server it still competes for the GIL with the engine's forward passes (each
needs the GIL between its ops, and waits up to the switch interval for it every time). So the
whole of it runs in a child process (`DatasetWorker`, one spawned process by default, started on
the first upload); the server only passes the raw bytes in and gets back a small result plus the
encoded dataset to publish. `LORADOCK_DATASET_WORKERS=0` runs the same function in the calling
thread instead (tests, tiny deployments).

Everything that crosses the process boundary is plain data (bytes, str, dict): a 422 comes back
as `(detail, extra)` and is raised again as `Unprocessable` in the parent.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from loradock.adapters import tasks
from loradock.adapters.core.text import JSONError, parse_json
from loradock.adapters.training.data import (
    Dataset,
    DatasetError,
    check_split_feasible,
    check_validation_labels,
    parse_upload,
    remove_leakage,
    validate_rows,
)
from loradock.service.errors import Unprocessable

log = logging.getLogger(__name__)

# A multipart form as read on the event loop: field -> str, or (file bytes, file name).
Form = dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """What the server accepts (from its settings), passed to the worker as plain data."""

    max_rows: int
    max_text_chars: int
    max_lora_rank: int
    serve_targets: tuple[str, ...]
    num_layers: int = 1_000_000  # blocks of the base model
    base_kind: str = "encoder"  # BaseModel.kind: which tasks this server trains


@dataclass(frozen=True)
class Prepared:
    """A validated training request: its small fields, and the dataset ready to store."""

    fields: dict[str, Any]  # name, task, hyperparameters, promote, validation_split
    labels: list[str]
    warnings: list[str]
    rows: int
    dataset: bytes  # the dataset file's content (service.jobs.decode_dataset reads it)


def prepare(raw: bytes | Form, schema: str, task: str | None, limits: Limits) -> Prepared:
    """Parse, validate and encode one training request; raises Unprocessable (422).

    `schema`: "AdapterCreate" (a new adapter: the body names its task) or "VersionCreate" (a new
    version: `task` is the adapter's)."""
    from loradock.service.api.schemas import AdapterCreate, VersionCreate
    from loradock.service.jobs import encode_dataset

    model = AdapterCreate if schema == "AdapterCreate" else VersionCreate
    body = _validate(model, _parse(raw))
    hp = body.hyperparameters
    if hp.rank > limits.max_lora_rank:
        raise Unprocessable(
            f"hyperparameters.rank: {hp.rank} > max_lora_rank {limits.max_lora_rank} of this "
            "server (setting LORADOCK_MAX_LORA_RANK)"
        )
    unknown = sorted(set(hp.target_modules or []) - set(limits.serve_targets))
    if unknown:
        raise Unprocessable(
            f"hyperparameters.target_modules: {unknown} are not served by this server "
            f"(serving targets: {list(limits.serve_targets)}; setting "
            "LORADOCK_SERVE_TARGET_MODULES)"
        )
    served = tasks.for_base(limits.base_kind)
    task_name = getattr(body, "task", None) or task or (served[0] if served else None)
    try:
        task_cls = tasks.get(str(task_name))
    except tasks.UnknownTask as e:
        raise Unprocessable(f"task: {e}") from e
    if task_cls.base_kind != limits.base_kind:
        kinds = {"encoder": "an encoder", "causal_lm": "a causal language model"}
        raise Unprocessable(
            f"task: {task_cls.name!r} needs {kinds.get(task_cls.base_kind, task_cls.base_kind)} "
            f"base; this server's base is {kinds.get(limits.base_kind, limits.base_kind)}, "
            f"which serves {served} (setting LORADOCK_BASE_MODEL)"
        )
    problems = task_cls.hyperparameter_problems(hp)
    if problems:
        raise Unprocessable(f"hyperparameters.serve: {problems[0]}")
    _check_layers(hp.trainable_layers, limits.num_layers)
    train, val = _datasets(task_cls, body, limits)
    if isinstance(hp.class_weights, dict):
        if not train.labels:
            raise Unprocessable(f"hyperparameters.class_weights: the {task_cls.name} task has "
                                "no classes to weigh")  # fmt: skip
        unknown = sorted(set(hp.class_weights) - set(train.labels))
        if unknown:
            raise Unprocessable(
                f"hyperparameters.class_weights: {unknown[0]!r} is not a label of the training "
                f"data (labels: {train.labels[:20]})"
            )
    fields = {
        "task": task_cls.name,
        "hyperparameters": hp.model_dump(),
        "hyperparameters_given": hp.model_dump(exclude_defaults=True),
        "promote": body.promote,
        "validation_split": body.validation_split,
    }
    if isinstance(body, AdapterCreate):
        fields["name"] = body.name
    return Prepared(
        fields=fields,
        labels=train.labels,
        warnings=train.warnings + (val.warnings if val else []),
        rows=len(train.examples),
        dataset=encode_dataset(train, val, body.validation_split),
    )


def _check_layers(setting: int | list[int] | None, n: int) -> None:
    if isinstance(setting, int) and setting > n:
        raise Unprocessable(
            f"hyperparameters.trainable_layers: the base model has {n} blocks; {setting} top "
            "blocks cannot be trained"
        )
    if isinstance(setting, list):
        outside = sorted(i for i in set(setting) if i >= n)
        if outside:
            raise Unprocessable(
                f"hyperparameters.trainable_layers: block {outside[0]} does not exist (the base "
                f"model has blocks 0..{n - 1})"
            )


def dataset_problem(e: DatasetError) -> Unprocessable:
    return Unprocessable(str(e), extra={"errors": [p.as_dict() for p in e.problems]})


def _parse(raw: bytes | Form) -> Any:
    """A JSON body, or a multipart form with training_file (JSONL/CSV) and form fields."""
    if isinstance(raw, bytes):
        try:
            return parse_json(raw)
        except JSONError as e:
            raise Unprocessable(f"body is not valid JSON: {e}") from e
    form: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("training_file", "validation_file"):
            data, filename = value
            target = "training_data" if key == "training_file" else "validation_data"
            try:
                form[target] = parse_upload(data, filename, target)
            except DatasetError as e:
                raise dataset_problem(e) from e
        elif key in ("hyperparameters", "label_names"):
            try:
                form[key] = parse_json(str(value)) if str(value).strip() else None
            except JSONError as e:
                what = "a JSON object" if key == "hyperparameters" else "valid JSON"
                raise Unprocessable(f"{key}: not {what}: {e}") from e
        else:
            form[key] = value
    if "training_data" not in form:
        raise Unprocessable("multipart upload needs a training_file (JSONL, CSV or Parquet)")
    return form


def _validate(model: Any, body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = [
            {"loc": ["body", *[str(p) for p in err["loc"]]], "msg": err["msg"], "type": err["type"]}
            for err in e.errors()
        ]
        first = errors[0]
        where = ".".join(first["loc"][1:]) or "body"
        raise Unprocessable(f"{where}: {first['msg']}", extra={"errors": errors}) from e


def _datasets(task: type[tasks.Task], body: Any, limits: Limits) -> tuple[Dataset, Dataset | None]:
    try:
        train = validate_rows(
            body.training_data, task, max_rows=limits.max_rows,
            max_text_chars=limits.max_text_chars, on_conflict=body.on_conflict,
            label_names=body.label_names,
        )  # fmt: skip
        val = None
        if body.validation_data is not None:
            val = validate_rows(
                body.validation_data, task, max_rows=limits.max_rows,
                max_text_chars=limits.max_text_chars, dataset="validation_data", min_rows=2,
                on_conflict=body.on_conflict, label_names=body.label_names,
            )  # fmt: skip
            check_validation_labels(train, val)
            remove_leakage(train, val)
        else:
            check_split_feasible(train)
    except DatasetError as e:
        raise dataset_problem(e) from e
    return train, val


def _prepare_in_child(
    raw: bytes | Form, schema: str, task: str | None, limits: Limits
) -> Prepared | tuple[str, dict[str, Any]]:
    """`prepare` with its 422 returned as plain data, (detail, extra): exceptions with keyword
    arguments do not pickle back across the process boundary."""
    try:
        return prepare(raw, schema, task, limits)
    except Unprocessable as e:
        return (e.detail, dict(e.extra))


def _exit_with_parent(parent: int) -> None:
    """In the child: exit as soon as the server process is gone (killed with -9, say), so a
    crashed server never leaves an orphaned worker holding memory."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="loradock-parent-watch", daemon=True).start()


def _started() -> None:
    """A no-op run in the child: submitting it makes the pool spawn its process."""


class DatasetWorker:
    """Runs `prepare` in a spawned child process (or inline with processes=0)."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the child now, in the background: its imports (torch, ~4 s on a small CPU) then
        overlap the base model's load instead of delaying the first upload."""
        if self.processes <= 0:
            return
        try:
            self._executor().submit(_started)
        except (BrokenProcessPool, OSError, RuntimeError) as e:  # the first upload retries
            log.warning("dataset worker could not start (%s)", e)

    def prepare(self, raw: bytes | Form, schema: str, task: str | None, limits: Limits) -> Prepared:
        """Blocking: call it from the thread pool, not the event loop."""
        if self.processes <= 0:
            return prepare(raw, schema, task, limits)
        try:
            result = self._executor().submit(_prepare_in_child, raw, schema, task, limits).result()
        except (BrokenProcessPool, OSError) as e:
            # The worker died (killed, out of memory) or could not start: start a fresh one next
            # time, and do this upload here rather than fail it.
            log.warning("dataset worker unavailable (%s); parsing this upload in-process", e)
            self.close()
            return prepare(raw, schema, task, limits)
        if isinstance(result, tuple):
            detail, extra = result
            raise Unprocessable(detail, extra=extra)
        return result

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the server holds torch threads and locks a fork would copy.
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=context,
                    initializer=_exit_with_parent,
                    initargs=(os.getpid(),),
                )
                log.info("dataset worker: %d process(es) for upload parsing", self.processes)
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
