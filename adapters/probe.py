"""The cheap baseline: a linear model on the frozen base's pooled embeddings (a linear probe).

Fitted full-batch with L-BFGS; its L2 strength is chosen by cross-validation on the training rows
only, so the validation set stays unseen until the final comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


@dataclass
class LinearHead:
    """weight: [out, hidden], bias: [out]; out = classes, or 1 for regression."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t() + self.bias


def _loss(
    out: torch.Tensor, y: torch.Tensor, regression: bool, class_weight: torch.Tensor | None
) -> torch.Tensor:
    if regression:
        return F.mse_loss(out.squeeze(-1), y)
    return F.cross_entropy(out, y, weight=class_weight)


def fit_linear(
    x: torch.Tensor,  # [n, hidden] float32
    y: torch.Tensor,  # [n] class indices, or standardized targets for regression
    n_out: int,
    *,
    l2: float,
    class_weight: torch.Tensor | None = None,
    max_iter: int = 100,
) -> LinearHead:
    regression = n_out == 1 and y.is_floating_point()
    w = torch.zeros(n_out, x.shape[1], requires_grad=True)
    b = torch.zeros(n_out, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )
    x = x.detach().float().cpu().clone()  # a normal tensor even if x came from inference_mode
    y = y.detach().cpu()
    cw = class_weight.cpu() if class_weight is not None else None

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(x @ w.t() + b, y, regression, cw) + l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearHead(weight=w.detach(), bias=b.detach())


def fit_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    n_out: int,
    *,
    class_weight: torch.Tensor | None = None,
    seed: int = 0,
    folds: int = 3,
) -> tuple[LinearHead, float]:
    """Choose L2 from L2_GRID by k-fold CV on (x, y), refit on all of it. Returns (head, l2)."""
    regression = n_out == 1 and y.is_floating_point()
    n = len(y)
    if n < 2 * folds:
        l2 = L2_GRID[1]
        return fit_linear(x, y, n_out, l2=l2, class_weight=class_weight), l2
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    best_l2, best_loss = L2_GRID[1], math.inf
    for l2 in L2_GRID:
        total = 0.0
        for k in range(folds):
            held = order[k::folds]
            mask = torch.ones(n, dtype=torch.bool)
            mask[held] = False
            head = fit_linear(x[mask], y[mask], n_out, l2=l2, class_weight=class_weight)
            total += float(_loss(head(x[held].float().cpu()), y[held].cpu(), regression, None))
        if total < best_loss:
            best_l2, best_loss = l2, total
    return fit_linear(x, y, n_out, l2=best_l2, class_weight=class_weight), best_l2
