"""Regression: one standardized output, decided by validation loss (MSE on standardized labels)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from loradock.adapters.monitoring.drift import psi_signal
from loradock.adapters.monitoring.profile import histogram
from loradock.adapters.tasks.base import Task, TaskStateError
from loradock.adapters.tasks.metrics import regression_metrics
from loradock.adapters.tasks.probe import LinearHead
from loradock.adapters.training.data import Dataset, DatasetError, Example, Problem

MAX_ABS_LABEL = 1e30  # beyond this, squares overflow float32 and the loss is meaningless


class Regression(Task):
    name = "regression"
    decision_metric = "val_loss"
    higher_is_better = False
    summary_keys: ClassVar[tuple[str, ...]] = ("loss", "mse", "mae", "r2")

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        self.mean = float(mean)
        self.std = float(std)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Regression) and (other.mean, other.std) == (self.mean, self.std)

    __hash__ = None  # type: ignore[assignment]

    # --- rows ----------------------------------------------------------------------------------

    @classmethod
    def parse_label(cls, value: Any) -> float:
        if isinstance(value, str) and not value.strip():
            raise ValueError("missing label")
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"regression label must be a finite number, got {str(value)[:40]!r}"
            ) from None
        if not math.isfinite(number) or abs(number) > MAX_ABS_LABEL:
            raise ValueError(
                f"regression label must be a finite number of magnitude at most {MAX_ABS_LABEL:g}"
            )
        return number

    @classmethod
    def check_labels(cls, examples: Sequence[Example], dataset: str) -> tuple[list[str], list[str]]:
        values = [float(e.label) for e in examples]
        if max(values) == min(values):
            raise DatasetError([Problem(None, "label", "all labels are equal", dataset)])
        return [], []

    @classmethod
    def strata(cls, examples: Sequence[Example]) -> list[str]:
        """Quantile bins of the label, so every split spans its range."""
        values = sorted(float(e.label) for e in examples)
        bins = min(5, max(1, len(values) // 4))
        edges = [values[int(len(values) * q / bins)] for q in range(1, bins)]
        return [str(sum(float(e.label) >= edge for edge in edges)) for e in examples]

    @classmethod
    def cv_folds(cls, train: Dataset, wanted: int) -> int:
        return max(2, min(wanted, len(train.examples) // 2))

    # --- state ---------------------------------------------------------------------------------

    @classmethod
    def from_dataset(cls, train: Dataset) -> Regression:
        values = [float(e.label) for e in train.examples]
        return cls(statistics.fmean(values), statistics.pstdev(values) or 1.0)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Regression:
        mean, std = meta.get("target_mean", 0.0), meta.get("target_std", 1.0)
        if isinstance(mean, bool) or not isinstance(mean, int | float) or not math.isfinite(mean):
            raise TaskStateError("target_mean must be a finite number")
        if (
            isinstance(std, bool)
            or not isinstance(std, int | float)
            or not math.isfinite(std)
            or std <= 0
        ):
            raise TaskStateError("target_std must be a finite number > 0")
        return cls(float(mean), float(std))

    def meta(self) -> dict[str, Any]:
        return {"target_mean": self.mean, "target_std": self.std}

    @property
    def n_outputs(self) -> int:
        return 1

    def values(self, outputs: torch.Tensor) -> torch.Tensor:
        """Head outputs [n, >=1] (standardized) -> predictions [n] in label units."""
        return outputs[:, 0].float() * self.std + self.mean

    # --- training ------------------------------------------------------------------------------

    def targets(self, examples: Sequence[Example]) -> torch.Tensor:
        return torch.tensor(
            [(float(e.label) - self.mean) / self.std for e in examples], dtype=torch.float32
        )

    def loss(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        class_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        return F.mse_loss(outputs[:, 0], targets)

    def metrics(self, outputs: torch.Tensor, examples: Sequence[Example]) -> dict[str, Any]:
        pred = self.values(outputs.detach().cpu())
        truth = torch.tensor([float(e.label) for e in examples])
        return regression_metrics(pred, truth, [e.group for e in examples], scale=self.std)

    # --- serving -------------------------------------------------------------------------------

    def decode(self, row: torch.Tensor) -> dict[str, Any]:
        return {"value": float(row.reshape(-1)[0]) * self.std + self.mean}

    def check_feedback_label(self, label: str | float) -> str:
        return str(self.parse_label(label))

    def export_head(self, head: LinearHead) -> tuple[LinearHead, dict[str, Any]]:
        """The label scaling folded in: the exported head outputs values in label units."""
        scaled = LinearHead(
            weight=head.weight[:1] * self.std, bias=head.bias[:1] * self.std + self.mean
        )
        return scaled, {
            "activation": "identity",
            "outputs": ["value"],
            "decode": "the output is the predicted value, in the training labels' units",
        }

    def output_tensors(self, predictions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        n = len(predictions) if predictions else -1
        data = [p["value"] for p in predictions]
        return [{"name": "value", "datatype": "FP32", "shape": [n], "data": data}]

    # --- drift ---------------------------------------------------------------------------------

    def profile(self, outputs: torch.Tensor) -> dict[str, Any]:
        values = self.values(outputs)
        qs = torch.quantile(values, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
        edges = [round(q, 6) for q in qs]
        return {
            "value_quantiles": edges,
            "value_edges": edges,
            "value_histogram": histogram(values.tolist(), qs),
        }

    def drift_signals(
        self, reference: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        if "value_histogram" not in reference:
            return {}
        edges = reference["value_edges"]
        values = [float(p.get("value") or 0.0) for p in predictions]
        return {
            "predicted_value": psi_signal(
                reference["value_histogram"], histogram(values, edges), edges=edges
            )
        }
