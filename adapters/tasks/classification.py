"""Single-label classification: a softmax head over the adapter's classes, decided by macro-F1."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from loradock.adapters.monitoring.drift import psi_signal
from loradock.adapters.monitoring.profile import confidence_edges, histogram
from loradock.adapters.tasks.base import LabelledTask
from loradock.adapters.tasks.metrics import classification_metrics
from loradock.adapters.tasks.probe import LinearHead
from loradock.adapters.training.data import Dataset, DatasetError, Example, Problem

MIN_PER_CLASS = 2  # one for training and one for validation, at the very least
IMBALANCE_RATIO = 10.0  # largest / smallest class above this earns a warning
MAX_LABEL_CHARS = 128


class Classification(LabelledTask):
    name = "classification"
    decision_metric = "val_macro_f1"
    higher_is_better = True
    summary_keys: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "macro_f1")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Classification) and other._labels == self._labels

    __hash__ = None  # type: ignore[assignment]

    # --- rows ----------------------------------------------------------------------------------

    @classmethod
    def parse_label(cls, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError("must be a string (or an integer class id)")
        label = str(value).strip()
        if not label:
            raise ValueError("missing label")
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"longer than {MAX_LABEL_CHARS} characters")
        return label

    @classmethod
    def check_labels(cls, examples: Sequence[Example], dataset: str) -> tuple[list[str], list[str]]:
        counts = Counter(str(e.label) for e in examples)
        if len(counts) < 2:
            raise DatasetError(
                [Problem(None, "label", f"{len(counts)} class found; at least 2 are needed",
                         dataset)]
            )  # fmt: skip
        warnings = []
        largest, smallest = max(counts.values()), min(counts.values())
        if largest / smallest > IMBALANCE_RATIO:
            warnings.append(
                f"{dataset}: labels are very imbalanced (largest class {largest} rows, smallest "
                f"{smallest}); consider class_weights='balanced'"
            )
        return sorted(counts), warnings

    @classmethod
    def validation_problems(cls, train: Dataset, validation: Dataset) -> list[Problem]:
        known = set(train.labels)
        return [
            Problem(i, "label", f"label {e.label!r} does not occur in training_data",
                    "validation_data")
            for i, e in enumerate(validation.examples, start=1)
            if str(e.label) not in known
        ]  # fmt: skip

    @classmethod
    def tie_tolerance(cls, n_validation: int) -> float:
        """One validation text's worth of accuracy: macro-F1 differences this small are what
        one or two texts flip on a small validation set."""
        return 1.0 / max(n_validation, 1)

    @classmethod
    def strata(cls, examples: Sequence[Example]) -> list[str]:
        return [str(e.label) for e in examples]

    @classmethod
    def split_problems(cls, train: Dataset) -> list[Problem]:
        small = {c: n for c, n in train.class_counts().items() if n < MIN_PER_CLASS}
        if not small:
            return []
        names = ", ".join(f"{c!r} ({n})" for c, n in sorted(small.items()))
        return [
            Problem(None, "label",
                    f"classes with fewer than {MIN_PER_CLASS} examples cannot be split into "
                    f"training and validation: {names}")
        ]  # fmt: skip

    @classmethod
    def cv_folds(cls, train: Dataset, wanted: int) -> int:
        return max(2, min(wanted, min(train.class_counts().values())))

    # --- state ---------------------------------------------------------------------------------

    @classmethod
    def from_dataset(cls, train: Dataset) -> Classification:
        return cls(train.labels)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Classification:
        return cls(cls.meta_labels(meta, 2))

    def meta(self) -> dict[str, Any]:
        return {"labels": list(self._labels)}

    # --- training ------------------------------------------------------------------------------

    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        return torch.tensor([self._index[str(e.label)] for e in examples], dtype=torch.long)

    def loss(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        class_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        return F.cross_entropy(
            outputs, targets, weight=class_weight, label_smoothing=label_smoothing
        )

    def class_weight(self, examples: Sequence[Example], setting: Any) -> torch.Tensor | None:
        if setting is None:
            return None
        if setting == "balanced":
            counts = torch.zeros(len(self._labels))
            for e in examples:
                counts[self._index[str(e.label)]] += 1
            return len(examples) / (len(self._labels) * counts.clamp(min=1))
        return torch.tensor([float(setting.get(lbl, 1.0)) for lbl in self._labels])

    def metrics(self, outputs: torch.Tensor, examples: Sequence[Example]) -> dict[str, Any]:
        return classification_metrics(
            outputs, self.targets(examples), self._labels, [e.group for e in examples]
        )

    # --- serving -------------------------------------------------------------------------------

    def decode(self, row: torch.Tensor) -> dict[str, Any]:
        probs = torch.softmax(row[: len(self._labels)].float(), dim=-1)
        k = int(probs.argmax())
        return {
            "label": self._labels[k],
            "score": float(probs[k]),
            "scores": {lbl: float(probs[c]) for c, lbl in enumerate(self._labels)},
        }

    def check_feedback_label(self, label: str | float) -> str:
        if str(label) not in self._index:
            raise ValueError(f"{label!r} is not a label of this adapter")
        return str(label)

    def export_head(self, head: LinearHead) -> tuple[LinearHead, dict[str, Any]]:
        return head, {
            "activation": "softmax",
            "outputs": list(self._labels),
            "decode": "softmax over the outputs; the label is the one with the highest score",
        }

    def output_tensors(self, predictions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        n = len(predictions) if predictions else -1
        return [
            {"name": "label", "datatype": "BYTES", "shape": [n],
             "data": [p["label"] for p in predictions]},
            {"name": "scores", "datatype": "FP32", "shape": [n, len(self._labels)],
             "data": [p["scores"][lbl] for p in predictions for lbl in self._labels]},
        ]  # fmt: skip

    # --- drift ---------------------------------------------------------------------------------

    def profile(self, outputs: torch.Tensor) -> dict[str, Any]:
        probs = torch.softmax(outputs.float()[:, : len(self._labels)], dim=-1)
        conf, pred = probs.max(dim=-1)
        counts = torch.bincount(pred, minlength=len(self._labels)).tolist()
        return {
            "label_distribution": {lbl: counts[i] for i, lbl in enumerate(self._labels)},
            "confidence_edges": confidence_edges(),
            "confidence_histogram": histogram(conf.tolist(), confidence_edges()),
        }

    def drift_signals(
        self, reference: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        if "label_distribution" not in reference:
            return {}
        labels = list(reference["label_distribution"])
        counts = Counter(p.get("label") for p in predictions)
        edges = reference["confidence_edges"]
        return {
            "predicted_label": psi_signal(
                [reference["label_distribution"][lbl] for lbl in labels],
                [counts.get(lbl, 0) for lbl in labels],
                names=labels,
            ),
            "confidence": psi_signal(
                reference["confidence_histogram"],
                histogram([float(p.get("score") or 0.0) for p in predictions], edges),
                edges=edges,
            ),
        }
