"""Multi-label classification: any number of an adapter's labels per text (tags, topics, intents).

- Rows: `"label"` (or `"labels"`) is a list of label names (`[]`: none of them applies), or one
  name, or in CSV a cell `a|b` or a JSON array. Rows repeating a text are one row per label, the
  "long" layout many exports use: their label sets are united (a warning counts them), not
  dropped as conflicting.
- Head: one logit per label, sigmoid; trained with binary cross-entropy summed over labels
  (`class_weights="balanced"` weighs each label's positives by its negatives/positives ratio).
- Decision metric: micro-F1 at the default threshold 0.5, which is stable on small validation sets
  where a rare label has one or two positives (macro-F1 would swing on each of them); macro-F1,
  subset accuracy (the whole set right), Hamming loss and a per-label table are reported too.
- Thresholds: after the served model is chosen, each label's probability threshold is set to the
  one that maximizes its F1 on out-of-sample outputs (the validation part, or the out-of-fold
  outputs under cross-validation). Whether that helps is measured first by cross-fitting (fit on
  one half, score on the other, both ways); thresholds stay at 0.5 when it does not.
- Baseline: one-vs-rest logistic regression on the frozen embeddings (the shared probe with this
  loss is exactly that, one C for all labels chosen by stratified CV on micro-F1).
- Drift: the share of each predicted label (and of "no label"), and the number of labels per text.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from loradock.adapters.core.text import encoding_problem
from loradock.adapters.monitoring.drift import psi_signal
from loradock.adapters.tasks.base import LabelledTask, TaskStateError
from loradock.adapters.tasks.classification import MAX_LABEL_CHARS
from loradock.adapters.tasks.metrics import multilabel_metrics
from loradock.adapters.tasks.probe import LinearHead
from loradock.adapters.training.data import Dataset, DatasetError, Example, Problem

SEPARATOR = "|"  # between labels in one CSV cell (or use a JSON array there)
NONE = "(none)"  # the stratum and drift bin of a text with no label
MAX_LABELS_PER_ROW = 256
DEFAULT_THRESHOLD = 0.5
THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95
MIN_CALIBRATION_ROWS = 20  # fewer out-of-sample rows: thresholds stay at 0.5
MIN_CALIBRATION_POSITIVES = 4  # a label with fewer positives there keeps 0.5
MAX_POS_WEIGHT = 100.0  # "balanced" weight cap for a label on almost no rows
CARDINALITY_BINS = ("0", "1", "2", "3+")


class MultiLabel(LabelledTask):
    name = "multilabel"
    decision_metric = "val_micro_f1"
    higher_is_better = True
    empty_label_ok = True
    summary_keys: ClassVar[tuple[str, ...]] = (
        "loss", "micro_f1", "macro_f1", "accuracy", "hamming_loss",
    )  # fmt: skip

    def __init__(self, labels: Sequence[str], thresholds: Sequence[float] | None = None) -> None:
        super().__init__(labels)
        self.thresholds = (
            [DEFAULT_THRESHOLD] * len(self._labels) if thresholds is None else list(thresholds)
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MultiLabel)
            and other._labels == self._labels
            and other.thresholds == self.thresholds
        )

    __hash__ = None  # type: ignore[assignment]

    # --- rows ----------------------------------------------------------------------------------

    @classmethod
    def parse_label(cls, value: Any) -> tuple[str, ...]:
        """A sorted tuple of distinct label names (possibly empty)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except ValueError:
                    raise ValueError("a cell starting with '[' must be a JSON array") from None
            else:
                value = [part for part in text.split(SEPARATOR) if part.strip()]
        elif isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of label names (or one name)")
        if len(value) > MAX_LABELS_PER_ROW:
            raise ValueError(f"{len(value)} labels; at most {MAX_LABELS_PER_ROW} per row")
        names = set()
        for item in value:
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise ValueError("each label must be a string (or an integer class id)")
            name = str(item).strip()
            if not name:
                raise ValueError("empty label name in the list")
            if len(name) > MAX_LABEL_CHARS:
                raise ValueError(f"a label is longer than {MAX_LABEL_CHARS} characters")
            if (problem := encoding_problem(name)) is not None:
                raise ValueError(problem)
            names.add(name)
        return tuple(sorted(names))

    @classmethod
    def merge_labels(cls, labels: Sequence[Any]) -> tuple[str, ...]:
        """Rows of one text with different label sets: one row per label, united."""
        return tuple(sorted({name for label in labels for name in label}))

    @classmethod
    def check_labels(cls, examples: Sequence[Example], dataset: str) -> tuple[list[str], list[str]]:
        counts = Counter(name for e in examples for name in _names(e))
        if not counts:
            raise DatasetError(
                [Problem(None, "label", "no row has a label; at least one label must occur",
                         dataset)]
            )  # fmt: skip
        n = len(examples)
        if all(c == n for c in counts.values()):
            raise DatasetError(
                [Problem(None, "label", f"every row has the same labels {sorted(counts)}: "
                         "there is nothing to learn", dataset)]
            )  # fmt: skip
        warnings = []
        constant = sorted(label for label, c in counts.items() if c == n)
        if constant:
            warnings.append(f"{dataset}: labels on every row (always predicted): {constant[:10]}")
        single = sorted(label for label, c in counts.items() if c == 1)
        if single:
            warnings.append(
                f"{dataset}: {len(single)} labels occur in one row only and cannot be validated "
                f"(they will rarely be predicted): {single[:10]}"
            )
        return sorted(counts), warnings

    @classmethod
    def validation_problems(cls, train: Dataset, validation: Dataset) -> list[Problem]:
        known = set(train.labels)
        problems = []
        for i, e in enumerate(validation.examples, start=1):
            unknown = sorted(set(_names(e)) - known)
            if unknown:
                problems.append(Problem(i, "label", f"label {unknown[0]!r} does not occur in "
                                        "training_data", "validation_data"))  # fmt: skip
        return problems

    @classmethod
    def tie_tolerance(cls, n_validation: int) -> float:
        return 1.0 / max(n_validation, 1)

    @classmethod
    def strata(cls, examples: Sequence[Example]) -> list[str]:
        """A text's rarest label (or "(none)"): splits and folds then spread every label, the
        rare ones first, over both sides (a light form of iterative stratification)."""
        counts = Counter(name for e in examples for name in _names(e))
        return [min(_names(e), key=lambda n: (counts[n], n), default=NONE) for e in examples]

    @classmethod
    def cv_folds(cls, train: Dataset, wanted: int) -> int:
        sizes = Counter(cls.strata(train.examples)).values()
        return max(2, min(wanted, min(sizes)))

    # --- state ---------------------------------------------------------------------------------

    @classmethod
    def from_dataset(cls, train: Dataset) -> MultiLabel:
        return cls(train.labels)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> MultiLabel:
        labels = cls.meta_labels(meta, 1)
        thresholds = meta.get("thresholds")
        if thresholds is not None and (
            not isinstance(thresholds, list)
            or len(thresholds) != len(labels)
            or not all(
                isinstance(t, int | float) and not isinstance(t, bool) and 0 < t < 1
                for t in thresholds
            )
        ):
            raise TaskStateError("thresholds must be one number in (0, 1) per label")
        return cls(labels, [float(t) for t in thresholds] if thresholds is not None else None)

    def meta(self) -> dict[str, Any]:
        return {"labels": list(self._labels), "thresholds": list(self.thresholds)}

    # --- training ------------------------------------------------------------------------------

    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        """[n, labels] multi-hot (labels this state does not know are ignored)."""
        y = torch.zeros(len(examples), len(self._labels))
        for i, e in enumerate(examples):
            for name in _names(e):
                j = self._index.get(name)
                if j is not None:
                    y[i, j] = 1.0
        return y

    def loss(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        class_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Binary cross-entropy summed over labels, mean over rows: per label, the loss of a
        logistic regression (so the probe's C means what it means in one-vs-rest)."""
        logits = outputs[:, : len(self._labels)]
        y = targets.to(logits.dtype)
        if label_smoothing:
            y = y * (1 - label_smoothing) + label_smoothing / 2
        per = F.binary_cross_entropy_with_logits(logits, y, pos_weight=class_weight,
                                                 reduction="none")  # fmt: skip
        return per.sum(dim=1).mean()

    def class_weight(self, examples: Sequence[Example], setting: Any) -> torch.Tensor | None:
        """A positive-example weight per label (BCE's pos_weight)."""
        if setting is None:
            return None
        if setting == "balanced":
            y = self.targets(examples)
            pos = y.sum(0)
            return ((len(examples) - pos) / pos.clamp(min=1)).clamp(1.0, MAX_POS_WEIGHT)
        return torch.tensor([float(setting.get(lbl, 1.0)) for lbl in self._labels])

    def metrics(self, outputs: torch.Tensor, examples: Sequence[Example]) -> dict[str, Any]:
        return multilabel_metrics(
            outputs, self.targets(examples), self._labels, torch.tensor(self.thresholds),
            [e.group for e in examples],
        )  # fmt: skip

    def calibrate(
        self, outputs: torch.Tensor, examples: Sequence[Example], *, seed: int = 0
    ) -> dict[str, Any]:
        """Per-label F1-optimal thresholds from out-of-sample outputs, if cross-fitting shows
        they beat 0.5 on micro-F1 (see the module docstring)."""
        n = len(examples)
        probs = torch.sigmoid(outputs.detach().float().cpu()[:, : len(self._labels)])
        truth = self.targets(examples) > 0.5
        default = torch.full((len(self._labels),), DEFAULT_THRESHOLD)
        at_default = _micro_f1(probs >= default, truth)
        report: dict[str, Any] = {"rows": n, "micro_f1_at_0.5": round(at_default, 5)}
        if n < MIN_CALIBRATION_ROWS:
            why = f"{n} out-of-sample rows < {MIN_CALIBRATION_ROWS}: thresholds 0.5"
            return {**report, "applied": False, "why": why}
        order = list(range(n))
        random.Random(seed).shuffle(order)
        halves = [torch.tensor(order[0::2]), torch.tensor(order[1::2])]
        pred = torch.zeros_like(truth)
        for fit_on, score_on in (halves, halves[::-1]):
            pred[score_on] = probs[score_on] >= _best_thresholds(probs[fit_on], truth[fit_on])
        cross_fitted = _micro_f1(pred, truth)
        report["micro_f1_cross_fitted"] = round(cross_fitted, 5)
        if cross_fitted <= at_default:
            return {**report, "applied": False,
                    "why": "tuned thresholds did not beat 0.5 on held-out halves"}  # fmt: skip
        self.thresholds = [round(float(t), 4) for t in _best_thresholds(probs, truth)]
        return {
            **report,
            "applied": True,
            "thresholds": dict(zip(self._labels, self.thresholds, strict=True)),
        }

    # --- serving -------------------------------------------------------------------------------

    def decode(self, row: torch.Tensor) -> dict[str, Any]:
        probs = torch.sigmoid(row[: len(self._labels)].float()).tolist()
        chosen = [j for j, p in enumerate(probs) if p >= self.thresholds[j]]
        chosen.sort(key=lambda j: -probs[j])
        return {
            "labels": [self._labels[j] for j in chosen],
            "scores": {lbl: float(probs[j]) for j, lbl in enumerate(self._labels)},
        }

    @staticmethod
    def prediction_value(prediction: Mapping[str, Any]) -> str:
        """The predicted set, canonical (sorted, `|`-joined): feedback counts exact matches."""
        return SEPARATOR.join(sorted(prediction.get("labels") or []))

    def check_feedback_label(self, label: Any) -> str:
        names = self.parse_label(label)
        unknown = sorted(set(names) - set(self._index))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a label of this adapter")
        return SEPARATOR.join(names)

    def export_head(self, head: LinearHead) -> tuple[LinearHead, dict[str, Any]]:
        return head, {
            "activation": "sigmoid",
            "outputs": list(self._labels),
            "thresholds": dict(zip(self._labels, self.thresholds, strict=True)),
            "decode": "sigmoid per output; a label is predicted when its probability is at least "
            "its threshold",
        }

    def output_tensors(self, predictions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """`labels`: each text's predicted set as a JSON array (BYTES); `predicted`: the same as
        a [n, labels] BOOL matrix in the model's label order; `scores`: [n, labels] FP32."""
        n = len(predictions) if predictions else -1
        width = len(self._labels)
        return [
            {"name": "labels", "datatype": "BYTES", "shape": [n],
             "data": [json.dumps(p["labels"]) for p in predictions]},
            {"name": "predicted", "datatype": "BOOL", "shape": [n, width],
             "data": [lbl in p["labels"] for p in predictions for lbl in self._labels]},
            {"name": "scores", "datatype": "FP32", "shape": [n, width],
             "data": [p["scores"][lbl] for p in predictions for lbl in self._labels]},
        ]  # fmt: skip

    # --- drift ---------------------------------------------------------------------------------

    def profile(self, outputs: torch.Tensor) -> dict[str, Any]:
        probs = torch.sigmoid(outputs.float()[:, : len(self._labels)])
        pred = probs >= torch.tensor(self.thresholds)
        per_row = pred.sum(dim=1).tolist()
        return {
            "label_frequency": {
                **{lbl: int(pred[:, j].sum()) for j, lbl in enumerate(self._labels)},
                NONE: sum(1 for k in per_row if k == 0),
            },
            "label_count_histogram": _cardinality(per_row),
        }

    def drift_signals(
        self, reference: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        if "label_frequency" not in reference:
            return {}
        names = list(reference["label_frequency"])
        counts = Counter(name for p in predictions for name in (p.get("labels") or [NONE]))
        return {
            "predicted_label": psi_signal(
                [reference["label_frequency"][name] for name in names],
                [counts.get(name, 0) for name in names],
                names=names,
            ),
            "label_count": psi_signal(
                reference["label_count_histogram"],
                _cardinality([len(p.get("labels") or []) for p in predictions]),
                names=list(CARDINALITY_BINS),
            ),
        }


def _names(e: Example) -> tuple[str, ...]:
    label = e.label
    if isinstance(label, tuple | list):
        return tuple(label)
    return (str(label),)


def _cardinality(per_row: Sequence[int]) -> list[int]:
    counts = [0] * len(CARDINALITY_BINS)
    for k in per_row:
        counts[min(int(k), len(CARDINALITY_BINS) - 1)] += 1
    return counts


def _micro_f1(pred: torch.Tensor, truth: torch.Tensor) -> float:
    tp = float((pred & truth).sum())
    wrong = float((pred != truth).sum())
    return 2 * tp / (2 * tp + wrong) if tp + wrong > 0 else 0.0


def _best_thresholds(probs: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per label, the grid threshold with the best F1 on (probs, truth), the one nearest 0.5
    among ties; 0.5 for a label with fewer than MIN_CALIBRATION_POSITIVES positives."""
    grid = torch.tensor(THRESHOLD_GRID)  # [G]
    pred = probs.unsqueeze(0) >= grid.view(-1, 1, 1)  # [G, n, L]
    t = truth.unsqueeze(0)
    tp = (pred & t).sum(1).float()
    wrong = (pred != t).sum(1).float()
    f1 = torch.where(tp + wrong > 0, 2 * tp / (2 * tp + wrong).clamp(min=1), torch.zeros_like(tp))
    f1 = f1 - 1e-6 * (grid.view(-1, 1) - DEFAULT_THRESHOLD).abs()  # ties: nearest 0.5
    best = grid[f1.argmax(dim=0)]
    enough = truth.sum(0) >= MIN_CALIBRATION_POSITIVES
    return torch.where(enough, best, torch.full_like(best, DEFAULT_THRESHOLD))
