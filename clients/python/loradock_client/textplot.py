"""Line charts drawn with ASCII characters (loss curves in a terminal, no dependencies)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MARKERS = "*o+x"
LABEL_WIDTH = 10


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _at(ys: Sequence[float | None], x: float) -> float | None:
    """Linear interpolation of ys at fractional index x (None where a neighbour is missing)."""
    i0 = math.floor(x)
    i1 = min(i0 + 1, len(ys) - 1)
    y0, y1 = ys[i0], ys[i1]
    if y0 is None or y1 is None or not (math.isfinite(y0) and math.isfinite(y1)):
        return y0 if x == i0 and y0 is not None and math.isfinite(y0) else None
    return y0 + (y1 - y0) * (x - i0)


def line_chart(
    series: Mapping[str, Sequence[float | None]],
    *,
    height: int = 10,
    width: int | None = None,
    x_labels: tuple[str, str] | None = None,
    x_name: str = "",
) -> list[str]:
    """Semantics: every series shares the y axis (min..max of all finite values) and the x axis
    (index 0..n-1 stretched over `width` columns, linearly interpolated between points). Each
    series gets its own marker; a cell two series share shows '#'. Returns the lines, legend last.
    """
    n = max((len(ys) for ys in series.values()), default=0)
    values = [v for ys in series.values() for v in _finite(ys)]
    if n == 0 or not values:
        return ["(nothing to plot)"]
    height = max(2, height)
    width = width or max(20, min(60, 4 * n))
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    grid = [[" "] * width for _ in range(height)]
    for k, ys in enumerate(series.values()):
        mark = MARKERS[k % len(MARKERS)]
        for col in range(width):
            x = col * (len(ys) - 1) / (width - 1) if len(ys) > 1 else 0.0
            y = _at(ys, x) if ys else None
            if y is None:
                continue
            row = round((hi - y) / (hi - lo) * (height - 1))
            cell = grid[row][col]
            grid[row][col] = mark if cell in (" ", mark) else "#"
    labels = {0: hi, height - 1: lo, (height - 1) // 2: (hi + lo) / 2}
    lines = []
    for r, cells in enumerate(grid):
        label = f"{labels[r]:.4g}" if r in labels else ""
        lines.append(f"{label:>{LABEL_WIDTH}} |{''.join(cells)}".rstrip())
    lines.append(" " * LABEL_WIDTH + " +" + "-" * width)
    if x_labels is not None:
        left, right = x_labels
        gap = max(1, width - len(left) - len(right))
        middle = x_name.center(gap) if len(x_name) + 2 <= gap else " " * gap
        lines.append(" " * (LABEL_WIDTH + 2) + left + middle + right)
    legend = "   ".join(f"{MARKERS[k % len(MARKERS)]} {name}" for k, name in enumerate(series))
    lines.append(" " * (LABEL_WIDTH + 2) + legend)
    return lines
