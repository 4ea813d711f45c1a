"""Drift statistics: live traffic against a version's reference profile.

- PSI (population stability index) of binned distributions: predicted labels, confidence,
  input length. 0 = identical; the common reading is < 0.1 stable, 0.1-0.2 moderate, > 0.2 shift.
- MMD (maximum mean discrepancy) between embedding samples with an RBF kernel whose bandwidth is
  the median pairwise distance (median heuristic), with a permutation test p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PSI_EPSILON = 1e-4  # stands in for empty bins, so an unseen bin is a large but finite term


def psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """PSI between two histograms (counts or shares) over the same bins."""
    if len(reference) != len(current):
        raise ValueError(f"bins differ: {len(reference)} vs {len(current)}")
    ref_total, cur_total = float(sum(reference)), float(sum(current))
    if ref_total <= 0 or cur_total <= 0:
        return 0.0
    total = 0.0
    for r, c in zip(reference, current, strict=True):
        p = max(r / ref_total, PSI_EPSILON)
        q = max(c / cur_total, PSI_EPSILON)
        total += (q - p) * math.log(q / p)
    return total


@dataclass(frozen=True)
class MMDResult:
    statistic: float  # unbiased MMD^2 estimate
    p_value: float  # share of permutations with a statistic at least as large
    bandwidth: float


def _mmd2(k: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased MMD^2 from the joint kernel matrix of [x; y] with x = first n rows."""
    m = k.shape[0] - n
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2 * kxy.mean()


def mmd_test(
    x: torch.Tensor,  # [n, d] reference sample
    y: torch.Tensor,  # [m, d] current sample
    *,
    permutations: int = 200,
    seed: int = 0,
) -> MMDResult:
    """RBF-kernel MMD with the median heuristic and a permutation p-value."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError("MMD needs at least 2 rows on each side")
    z = torch.cat([x, y]).double()
    d2 = torch.cdist(z, z).pow(2)
    off_diag = d2[~torch.eye(len(z), dtype=torch.bool)]
    median = float(off_diag.median())
    bandwidth = math.sqrt(median / 2) if median > 0 else 1.0
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n = len(x)
    observed = float(_mmd2(k, n))
    g = torch.Generator().manual_seed(seed)
    at_least = 0
    for _ in range(permutations):
        perm = torch.randperm(len(z), generator=g)
        if float(_mmd2(k[perm][:, perm], n)) >= observed:
            at_least += 1
    return MMDResult(
        statistic=observed, p_value=(at_least + 1) / (permutations + 1), bandwidth=bandwidth
    )
