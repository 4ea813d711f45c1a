"""Reference profiles: what an adapter version's outputs look like on data it was validated on.

Stored with each version and compared with live traffic to measure drift: the predicted-label
distribution, a confidence histogram, an input-length histogram (in tokens) and a sample of pooled
embeddings (from the adapted model, the same vectors the serving forward pass computes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

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
    task: str,
    labels: Sequence[str],
    outputs: torch.Tensor,  # [n, C] logits, or [n] regression values in label units
    pooled: torch.Tensor,  # [n, hidden]
    token_lengths: Sequence[int],
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Returns (JSON part, tensors part) of the profile."""
    n = len(token_lengths)
    profile: dict[str, Any] = {
        "format": 1,
        "rows": n,
        "length_edges": list(LENGTH_EDGES),
        "length_histogram": histogram(token_lengths, LENGTH_EDGES),
    }
    if task == "classification":
        probs = torch.softmax(outputs.float(), dim=-1)
        conf, pred = probs.max(dim=-1)
        counts = torch.bincount(pred, minlength=len(labels)).tolist()
        profile["label_distribution"] = {lbl: counts[i] for i, lbl in enumerate(labels)}
        profile["confidence_edges"] = confidence_edges()
        profile["confidence_histogram"] = histogram(conf.tolist(), confidence_edges())
    else:
        values = outputs.float().reshape(-1)
        qs = torch.quantile(values, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
        profile["value_quantiles"] = [round(q, 6) for q in qs]
        profile["value_edges"] = [round(q, 6) for q in qs]
        profile["value_histogram"] = histogram(values.tolist(), qs)
    g = torch.Generator().manual_seed(seed)
    take = torch.randperm(n, generator=g)[:EMBEDDING_SAMPLE]
    tensors = {"embeddings": pooled.float().cpu()[take].contiguous()}
    profile["embedding_sample"] = len(take)
    return profile, tensors
