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


def psi_noise(bins: int, n_reference: float, n_current: float) -> float:
    """The PSI expected between two samples of one distribution, from sampling noise alone:
    about (bins - 1) * (1/n + 1/m). With a 50-row reference and 10 bins that is already ~0.2,
    the usual alarm threshold, so thresholds are applied to PSI minus this."""
    if n_reference <= 0 or n_current <= 0 or bins < 2:
        return 0.0
    return (bins - 1) * (1.0 / n_reference + 1.0 / n_current)


def psi_excess(reference: Sequence[float], current: Sequence[float]) -> tuple[float, float, float]:
    """(raw PSI, expected noise, PSI beyond the noise floored at 0) over the occupied bins."""
    raw = psi(reference, current)
    occupied = sum(1 for r, c in zip(reference, current, strict=True) if r > 0 or c > 0)
    noise = psi_noise(occupied, float(sum(reference)), float(sum(current)))
    return raw, noise, max(0.0, raw - noise)


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
    n, total = len(x), len(z)
    # Permutation test on the biased statistic s^T K s with s = +1/n on one side, -1/m on the
    # other: all permutations at once, one [P, N] x [N, N] product instead of P re-indexings.
    g = torch.Generator().manual_seed(seed)
    sign = torch.cat([torch.full((n,), 1.0 / n), torch.full((total - n,), -1.0 / (total - n))])
    perms = torch.stack([torch.randperm(total, generator=g) for _ in range(permutations)])
    s = torch.cat([sign.unsqueeze(0), sign[perms]]).double()  # row 0 = the observed split
    stats = ((s @ k) * s).sum(dim=1)
    at_least = int((stats[1:] >= stats[0]).sum())
    return MMDResult(
        statistic=float(_mmd2(k, n)),
        p_value=(at_least + 1) / (permutations + 1),
        bandwidth=bandwidth,
    )


def shares(counts: Sequence[float]) -> list[float]:
    """Counts as shares of their total (4 decimals)."""
    total = float(sum(counts)) or 1.0
    return [round(c / total, 4) for c in counts]


def psi_signal(
    reference: Sequence[float],
    current: Sequence[float],
    *,
    edges: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, object]:
    """One drift signal over binned counts: PSI beyond the noise, raw PSI, the noise, and both
    distributions as shares (keyed by bin name when `names` is given, else listed with `edges`)."""
    raw, noise, excess = psi_excess(reference, current)
    out: dict[str, object] = {
        "psi": round(excess, 4),
        "psi_raw": round(raw, 4),
        "psi_noise": round(noise, 4),
    }
    if names is not None:
        out["reference"] = dict(zip(names, shares(reference), strict=True))
        out["current"] = dict(zip(names, shares(current), strict=True))
    else:
        out["edges"] = list(edges or [])
        out["reference"] = shares(reference)
        out["current"] = shares(current)
    return out
