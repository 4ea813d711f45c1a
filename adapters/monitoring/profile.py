"""Reference profiles: what an adapter version's outputs look like on data it was validated on.

Stored with each version and compared with live traffic to measure drift: the predicted-label
distribution, a confidence histogram, an input-length histogram (in tokens) and a sample of pooled
embeddings (from the adapted model, the same vectors the serving forward pass computes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from loradock.adapters.tasks.base import Task

CONFIDENCE_BINS = 10
LENGTH_EDGES = (8, 16, 32, 64, 128, 256, 512)  # token-count bin upper edges; one more bin above
EMBEDDING_SAMPLE = 256


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin: (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        i = 0
        while i < len(edges) and v > edges[i]:
            i += 1
        counts[i] += 1
    return counts


def confidence_edges() -> list[float]:
    return [round((i + 1) / CONFIDENCE_BINS, 4) for i in range(CONFIDENCE_BINS - 1)]


def build_profile(
    *,
    task: Task,
    outputs: torch.Tensor,  # [n, n_outputs] head outputs
    pooled: torch.Tensor,  # [n, hidden]
    token_lengths: Sequence[int],
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Returns (JSON part, tensors part) of the profile: input lengths and an embedding sample
    for every task, plus the task's own part (`Task.profile`: predicted labels, values, ...)."""
    n = len(token_lengths)
    profile: dict[str, Any] = {
        "format": 1,
        "rows": n,
        "length_edges": list(LENGTH_EDGES),
        "length_histogram": histogram(token_lengths, LENGTH_EDGES),
    }
    profile.update(task.profile(outputs))
    g = torch.Generator().manual_seed(seed)
    take = torch.randperm(n, generator=g)[:EMBEDDING_SAMPLE]
    tensors = {"embeddings": pooled.float().cpu()[take].contiguous()}
    profile["embedding_sample"] = len(take)
    return profile, tensors
