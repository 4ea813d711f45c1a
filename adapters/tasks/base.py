"""The task interface: one class per task owns everything that differs between tasks.

A task class is registered by name (`loradock.adapters.tasks.get`). Its class methods are what a
task is before there is data (row checks, how to stratify, which metric decides); an instance is
one adapter version's task state (its labels, its label scaling), built from a dataset for
training or from the artifact's `loradock.json` for serving, and written back there by `meta()`.

Semantics every task keeps:
- head outputs are `[n, n_outputs]` float tensors; `metrics`, `decode` and `profile` take them as
  the head produced them (a task rescales internally if it trained on scaled targets);
- `metrics()` returns `loss` plus the task's scores; `summary()` turns them into the `val_*`
  record stored per epoch; `decision_metric` names the one `val_*` key that early stopping's
  winner choice (LoRA vs the baseline) and promotion (new vs live version) compare, through
  `better()` only;
- predictions are JSON objects; `prediction_value()` is the one field feedback compares;
- `fit_baseline()` is the cheaper alternative LoRA is compared with (a linear probe by default).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from loradock.adapters.tasks.probe import DEFAULT_C, LinearHead, fit_linear, fit_probe, l2_for

if TYPE_CHECKING:
    from loradock.adapters.training.data import Dataset, Example, Problem


class TaskStateError(ValueError):
    """A task section of loradock.json that cannot be served (the message says why)."""


def rounded(m: Mapping[str, Any], digits: int = 5) -> dict[str, Any]:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in m.items()}


class Task(ABC):
    """One task: row schema, head and loss, metrics and the decision metric, decoding, drift."""

    name: ClassVar[str]
    decision_metric: ClassVar[str]  # a `val_*` key of `summary()`
    higher_is_better: ClassVar[bool]
    empty_label_ok: ClassVar[bool] = (
        False  # an empty label cell is a value (no labels), not missing
    )
    # The kind of base model (`BaseModel.kind`) the task trains on and is served by.
    base_kind: ClassVar[str] = "encoder"
    # Head-based tasks (pooled embedding -> head) train with the LP-FT Trainer and serve through
    # the engine's heads; a task without one (generation) brings its own trainer (`trainer`).
    has_head: ClassVar[bool] = True
    # Rows other than {"text", "label", "group"}: the task parses them itself (`check_row`).
    custom_rows: ClassVar[bool] = False

    # --- rows (before any state exists) --------------------------------------------------------

    @classmethod
    @abstractmethod
    def parse_label(cls, value: Any) -> str | float | tuple[str, ...]:
        """A row's label as the task stores it; ValueError with a short reason if it is not one."""

    @classmethod
    def check_row(
        cls, row: Mapping[str, Any], max_chars: int
    ) -> tuple[tuple[str, Any] | None, list[tuple[str, str]]]:
        """For `custom_rows` tasks: ((the row's text key, its label), []) or (None, problems as
        (field, message))."""
        raise NotImplementedError

    @classmethod
    def trainer(cls, base: Any, gate: Any) -> Any:
        """What trains this task's adapters (`run(train, hp, ...)` -> TrainOutcome)."""
        from loradock.adapters.training.trainer import Trainer

        return Trainer(base, gate)

    @classmethod
    def hyperparameter_problems(cls, hp: Any) -> list[str]:
        """Hyperparameters that make no sense for this task (422 before anything is queued)."""
        if hp.serve == "base":
            return ["serve='base' is for generation; a head needs LoRA or the linear probe "
                    "(serve='probe')"]  # fmt: skip
        return []

    @classmethod
    def merge_labels(cls, labels: Sequence[Any]) -> Any | None:
        """The one label of a text that rows gave different `labels`, or None: the rows conflict
        (dropped with a warning, or refused). Multi-label tasks unite them."""
        return None

    @classmethod
    @abstractmethod
    def check_labels(cls, examples: Sequence[Example], dataset: str) -> tuple[list[str], list[str]]:
        """(the sorted class names or [], warnings) of a deduplicated dataset; raises
        DatasetError when it cannot be trained on (one class, all targets equal, ...)."""

    @classmethod
    def validation_problems(cls, train: Dataset, validation: Dataset) -> list[Problem]:
        """Rows of a given validation set that the trained model could never answer."""
        return []

    @classmethod
    @abstractmethod
    def strata(cls, examples: Sequence[Example]) -> list[str]:
        """A stratum per example: splits and folds keep every stratum's share."""

    @classmethod
    def split_problems(cls, train: Dataset) -> list[Problem]:
        """Why the dataset cannot be split into training and validation parts, if it cannot."""
        return []

    @classmethod
    @abstractmethod
    def cv_folds(cls, train: Dataset, wanted: int) -> int:
        """How many cross-validation folds a small dataset supports (at least 2)."""

    @classmethod
    def better(cls, new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
        """Does `new` beat `old` on the decision metric? Missing on `new`: no; on `old`: yes."""
        a, b = new.get(cls.decision_metric), old.get(cls.decision_metric)
        if not isinstance(a, int | float) or not math.isfinite(a):
            return False
        if not isinstance(b, int | float) or not math.isfinite(b):
            return True
        return a > b if cls.higher_is_better else a < b

    @classmethod
    def tie_tolerance(cls, n_validation: int) -> float:
        """Decision-metric differences at most this small are ties (decided by validation
        loss): a difference the validation set cannot resolve."""
        return 0.0

    # --- state ---------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_dataset(cls, train: Dataset) -> Task:
        """The task state a training run on `train` starts from."""

    @classmethod
    @abstractmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Task:
        """The task state of a stored version; TaskStateError if `meta` is not a valid one."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """This task's section of loradock.json (`from_meta(meta())` gives an equal state)."""

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Width of the head: [n_outputs, hidden] weight."""

    @property
    def labels(self) -> list[str]:
        return []

    # --- training ------------------------------------------------------------------------------

    @abstractmethod
    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        """What the head is trained to output for `examples` ([n] class ids or [n] values)."""

    @abstractmethod
    def loss(
        self,
        outputs: torch.Tensor,  # [n, n_outputs]
        targets: torch.Tensor,  # [n], from `targets`
        *,
        class_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """The training loss (a scalar), also what the probe and validation report as `loss`."""

    def class_weight(self, examples: Sequence[Example], setting: Any) -> torch.Tensor | None:
        """Per-output loss weights from the `class_weights` hyperparameter (None: unweighted)."""
        return None

    def fit_baseline(
        self,
        x: torch.Tensor,  # [n, hidden] frozen pooled embeddings of the training rows
        y: torch.Tensor,  # [n] from `targets`
        *,
        examples: Sequence[Example],  # the rows of x, for folds and metrics
        class_weight: torch.Tensor | None = None,
        seed: int = 0,
    ) -> tuple[LinearHead, dict[str, Any]]:
        """The cheaper alternative LoRA must beat, as a head on the frozen embeddings, and what
        it is (`kind` and its settings). Default: a logistic/linear regression on standardized
        embeddings whose C is chosen by stratified cross-validation on the training rows."""
        head, settings = fit_probe(
            x, y, self, examples=examples, class_weight=class_weight, seed=seed
        )
        return head, {"kind": "linear_probe", **settings}

    def refit_baseline(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: Mapping[str, Any],
        *,
        class_weight: torch.Tensor | None = None,
    ) -> LinearHead:
        """The baseline with already chosen `settings` (from `fit_baseline`), fit on (x, y):
        how a chosen probe is refit on every row before it is served."""
        c = float(settings.get("C", DEFAULT_C))
        return fit_linear(x, y, self, l2=l2_for(c, len(y)), class_weight=class_weight,
                          standardize=bool(settings.get("standardized", True)))  # fmt: skip

    def calibrate(
        self, outputs: torch.Tensor, examples: Sequence[Example], *, seed: int = 0
    ) -> dict[str, Any]:
        """Fit serving-time settings of this state (e.g. decision thresholds) on the served
        model's out-of-sample outputs for `examples`, after the winner is chosen; returns what
        was done for the version's report ({} if the task has nothing to calibrate)."""
        return {}

    @abstractmethod
    def metrics(self, outputs: torch.Tensor, examples: Sequence[Example]) -> dict[str, Any]:
        """Validation metrics of head outputs [n, n_outputs] against `examples`' labels:
        `loss` and the task's scores, plus `per_group`/`group_gap` when rows have groups."""

    summary_keys: ClassVar[tuple[str, ...]] = ("loss",)

    def summary(self, m: Mapping[str, Any]) -> dict[str, Any]:
        """The stored record of `metrics()`: `val_<key>` per score, plus per-class/group tables."""
        s: dict[str, Any] = {f"val_{k}": m[k] for k in self.summary_keys if k in m}
        for k in ("group_gap", "per_class", "per_group"):
            if k in m:
                s[k] = m[k]
        return rounded(s)

    # --- serving -------------------------------------------------------------------------------

    @abstractmethod
    def decode(self, row: torch.Tensor) -> dict[str, Any]:
        """One row of head output [>= n_outputs] (host memory) as a prediction."""

    @staticmethod
    def prediction_value(prediction: Mapping[str, Any]) -> str:
        """The part of a prediction that feedback's true label is compared with."""
        return str(prediction.get("label", prediction.get("value")))

    def check_feedback_label(self, label: Any) -> str:
        """A feedback label as stored; ValueError if this adapter could never predict it."""
        return str(label)

    @abstractmethod
    def export_head(self, head: LinearHead) -> tuple[LinearHead, dict[str, Any]]:
        """The head as an export ships it, and how to read its outputs outside loradock
        (`activation`: softmax | sigmoid | identity, `outputs`: a name per output, and whatever
        else decoding needs, e.g. thresholds). The head may be rescaled so that its outputs are
        in label units."""

    @abstractmethod
    def output_tensors(self, predictions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Predictions as named tensors (name, datatype, shape, data) for the Open Inference
        Protocol; with an empty list, the same tensors with shape -1 (model metadata)."""

    # --- drift ---------------------------------------------------------------------------------

    @abstractmethod
    def profile(self, outputs: torch.Tensor) -> dict[str, Any]:
        """The task's part of a reference profile from head outputs on reference texts."""

    @abstractmethod
    def drift_signals(
        self, reference: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Drift of live predictions against the profile's task part, one entry per signal:
        `psi` (beyond sampling noise), `psi_raw`, `psi_noise`, and the two distributions."""


class LabelledTask(Task):
    """A task over a fixed list of label names (one output per label): the state both
    classification tasks share."""

    def __init__(self, labels: Sequence[str]) -> None:
        self._labels = list(labels)
        self._index = {label: i for i, label in enumerate(self._labels)}

    @staticmethod
    def meta_labels(meta: Mapping[str, Any], minimum: int) -> list[str]:
        """The `labels` of a loradock.json: at least `minimum` distinct non-empty strings."""
        labels = meta.get("labels")
        if (
            not isinstance(labels, list)
            or len(labels) < minimum
            or not all(isinstance(x, str) and x for x in labels)
            or len(set(labels)) != len(labels)
        ):
            raise TaskStateError(f"labels must be a list of at least {minimum} distinct strings")
        return labels

    @property
    def n_outputs(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> list[str]:
        return list(self._labels)
