"""The cheap baseline: a logistic (or linear) regression on the frozen base's pooled embeddings.

This is the standard probe a practitioner would fit by hand (scikit-learn's LogisticRegression in
a grid search), done in torch so it runs wherever the base runs:
- features are standardized (per-dimension mean and scale of the training rows), and the scaling
  is folded back into the head, so the served head is still one [out, hidden] matrix and bias;
- the L2 strength is chosen by stratified k-fold cross-validation on the training rows over a wide
  grid of C (scikit-learn's convention: loss summed over rows + |W|^2 / 2C), scored on the pooled
  out-of-fold predictions by the task's decision metric (macro-F1 for classification), ties
  broken by the out-of-fold loss;
- the chosen C is refit on all of the rows it was given.

What was measured before choosing this (bench/README.md, "Probe"): selecting C by the decision
metric beat selecting it by log loss on two of three real sets; L2-normalizing the embeddings did
not help on any of them, so the head needs no normalization step at serving time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from loradock.adapters.training.data import stratified_fold_ids

if TYPE_CHECKING:
    from loradock.adapters.tasks.base import Task
    from loradock.adapters.training.data import Example

# Inverse L2 strength, scikit-learn's convention: 1e-3 .. 1e3 in half decades.
C_GRID = tuple(round(10 ** (k / 2), 6) for k in range(-6, 7))
DEFAULT_C = 1.0  # too few rows to cross-validate: scikit-learn's default
PROBE_FOLDS = 5


@dataclass
class LinearHead:
    """weight: [out, hidden], bias: [out]; out = classes, or 1 for regression."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


def l2_for(c: float, n: int) -> float:
    """The L2 coefficient on the mean loss that equals C's penalty on the summed loss."""
    return 1.0 / (2.0 * c * max(n, 1))


def fit_linear(
    x: torch.Tensor,  # [n, hidden] float32
    y: torch.Tensor,  # [n] the task's targets
    task: Task,
    *,
    l2: float,
    class_weight: torch.Tensor | None = None,
    max_iter: int = 100,
    standardize: bool = False,
) -> LinearHead:
    """Minimise the task's mean loss + l2 * |W|^2 over a [n_outputs, hidden] linear head.

    With `standardize`, the fit runs on standardized features (the penalty then treats every
    dimension alike) and the returned head takes raw features."""
    x = x.detach().float().cpu().clone()  # a normal tensor even if x came from inference_mode
    y = y.detach().cpu()
    if not standardize:
        return _lbfgs(x, y, task, l2, class_weight, max_iter)
    mean, scale = _moments(x)
    head = _lbfgs((x - mean) / scale, y, task, l2, class_weight, max_iter)
    return _unstandardize(head, mean, scale)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    scale = x.std(0, unbiased=False) if len(x) > 1 else torch.ones(x.shape[1])
    return mean, scale.clamp_min(1e-6)


def _unstandardize(head: LinearHead, mean: torch.Tensor, scale: torch.Tensor) -> LinearHead:
    weight = head.weight / scale
    return LinearHead(weight=weight, bias=head.bias - weight @ mean)


def _lbfgs(
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task,
    l2: float,
    class_weight: torch.Tensor | None,
    max_iter: int,
    init: LinearHead | None = None,
) -> LinearHead:
    if init is not None:
        w = init.weight.detach().clone().requires_grad_(True)
        b = init.bias.detach().clone().requires_grad_(True)
    else:
        w = torch.zeros(task.n_outputs, x.shape[1], requires_grad=True)
        b = torch.zeros(task.n_outputs, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        line_search_fn="strong_wolfe",
    )
    cw = class_weight.cpu() if class_weight is not None else None

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task.loss(x @ w.t() + b, y, class_weight=cw) + l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearHead(weight=w.detach(), bias=b.detach())


def fit_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task,
    *,
    examples: Sequence[Example],
    class_weight: torch.Tensor | None = None,
    seed: int = 0,
    folds: int = PROBE_FOLDS,
) -> tuple[LinearHead, dict[str, Any]]:
    """Choose C from C_GRID by stratified k-fold CV on (x, y), refit on all of it.

    Returns (head, settings): settings has `C`, `standardized` and, when CV ran, `cv_folds`,
    `cv_<decision metric>` and `cv_loss` of the chosen C."""
    x = x.detach().float().cpu()
    y = y.detach().cpu()
    n = len(y)
    strata = type(task).strata(examples)
    k = min(folds, n // 2)
    settings: dict[str, Any] = {"standardized": True}
    if k < 2:
        head = fit_linear(x, y, task, l2=l2_for(DEFAULT_C, n), class_weight=class_weight,
                          standardize=True)  # fmt: skip
        return head, {**settings, "C": DEFAULT_C, "why": f"{n} rows: too few to cross-validate"}
    fold_of = torch.tensor(stratified_fold_ids(strata, k, seed))
    key = type(task).decision_metric
    parts = []
    for f in range(k):
        held = fold_of == f
        if bool(held.any()) and not bool(held.all()):
            mean, scale = _moments(x[~held])
            parts.append((held, (x[~held] - mean) / scale, (x[held] - mean) / scale))
    best: dict[str, Any] | None = None
    warm: dict[int, LinearHead] = {}
    # Strong to weak regularization, each fold warm-started from the previous C's solution.
    for c in C_GRID:
        oof = torch.empty(n, task.n_outputs)
        for i, (held, z_tr, z_va) in enumerate(parts):
            head = _lbfgs(z_tr, y[~held], task, l2_for(c, len(z_tr)), class_weight, 100,
                          warm.get(i))  # fmt: skip
            warm[i] = head
            oof[held] = head(z_va)
        m = task.summary(task.metrics(oof, examples))
        score, loss = m.get(key), m.get("val_loss")
        if not isinstance(score, int | float) or not math.isfinite(score):
            continue
        candidate = {"C": c, "cv_folds": len(parts), f"cv_{key[4:]}": score, "cv_loss": loss}
        if best is None or _better(task, candidate, best, key):
            best = candidate
    chosen = best if best is not None else {"C": DEFAULT_C}
    head = fit_linear(x, y, task, l2=l2_for(chosen["C"], n), class_weight=class_weight,
                      standardize=True)  # fmt: skip
    return head, {**settings, **chosen}


def _better(task: Task, new: dict[str, Any], old: dict[str, Any], key: str) -> bool:
    """Higher (or lower) decision metric; on a tie, the lower out-of-fold loss."""
    a, b = new[f"cv_{key[4:]}"], old[f"cv_{key[4:]}"]
    if abs(a - b) > 1e-9:
        return a > b if type(task).higher_is_better else a < b
    la, lb = new.get("cv_loss"), old.get("cv_loss")
    return la is not None and (lb is None or la < lb)
