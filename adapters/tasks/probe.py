"""The cheap baseline: a linear model on the frozen base's pooled embeddings (a linear probe).

Fitted full-batch with L-BFGS; its L2 strength is chosen by cross-validation on the training rows
only (folds stratified like every other split), so the validation set stays unseen until the
final comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loradock.adapters.training.data import stratified_fold_ids

if TYPE_CHECKING:
    from loradock.adapters.tasks.base import Task

L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


@dataclass
class LinearHead:
    """weight: [out, hidden], bias: [out]; out = classes, or 1 for regression."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


def fit_linear(
    x: torch.Tensor,  # [n, hidden] float32
    y: torch.Tensor,  # [n] the task's targets
    task: Task,
    *,
    l2: float,
    class_weight: torch.Tensor | None = None,
    max_iter: int = 100,
) -> LinearHead:
    """Minimise the task's loss + l2 * |W|^2 over a [n_outputs, hidden] linear head."""
    w = torch.zeros(task.n_outputs, x.shape[1], requires_grad=True)
    b = torch.zeros(task.n_outputs, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )
    x = x.detach().float().cpu().clone()  # a normal tensor even if x came from inference_mode
    y = y.detach().cpu()
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
    strata: Sequence[str],
    class_weight: torch.Tensor | None = None,
    seed: int = 0,
    folds: int = 3,
) -> tuple[LinearHead, float]:
    """Choose L2 from L2_GRID by stratified k-fold CV on (x, y), refit on all of it.
    Returns (head, l2)."""
    n = len(y)
    if n < 2 * folds:
        l2 = L2_GRID[1]
        return fit_linear(x, y, task, l2=l2, class_weight=class_weight), l2
    fold_of = torch.tensor(stratified_fold_ids(strata, folds, seed))
    best_l2, best_loss = L2_GRID[1], math.inf
    x = x.float().cpu()
    y = y.cpu()
    for l2 in L2_GRID:
        total = 0.0
        for k in range(folds):
            held = fold_of == k
            if not bool(held.any()) or bool(held.all()):
                continue
            head = fit_linear(x[~held], y[~held], task, l2=l2, class_weight=class_weight)
            total += float(task.loss(head(x[held]), y[held]))
        if total < best_loss:
            best_l2, best_loss = l2, total
    return fit_linear(x, y, task, l2=best_l2, class_weight=class_weight), best_l2
