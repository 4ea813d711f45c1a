"""Small synthetic labelled datasets whose labels are learnable from keywords (for tiny models)."""

from __future__ import annotations

import random

from tests.tiny_models import WORDS

KEYWORDS = {
    "billing": ["refund", "invoice", "charge", "payment", "card"],
    "login": ["login", "password", "account", "error"],
    "shipping": ["shipping", "delivery", "package", "tracking", "late"],
}
FILLER = [w for w in WORDS if all(w not in ks for ks in KEYWORDS.values())]


def keyword_rows(per_class: int = 20, seed: int = 0, groups: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, keys in KEYWORDS.items():
        for i in range(per_class):
            words = rng.sample(FILLER, rng.randint(3, 8)) + rng.sample(keys, 2)
            rng.shuffle(words)
            row = {"text": " ".join(words), "label": label}
            if groups:
                row["group"] = "eu" if i % 2 else "us"
            rows.append(row)
    rng.shuffle(rows)
    return rows


def regression_rows(n: int = 60, seed: int = 0) -> list[dict]:
    """The label is the number of 'very' words, plus noise: learnable from token counts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 5)
        words = rng.sample(FILLER, 4) + ["very"] * k
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": k + rng.uniform(-0.2, 0.2)})
    return rows


def multilabel_rows(n: int = 60, seed: int = 0) -> list[dict]:
    """Each text carries the keywords of 0-3 of the KEYWORDS topics; its labels are those
    topics (a list, possibly empty): learnable per label from keywords."""
    rng = random.Random(seed)
    topics = list(KEYWORDS)
    rows = []
    for i in range(n):
        k = [0, 1, 1, 2, 2, 3][i % 6]
        chosen = sorted(rng.sample(topics, k))
        words = rng.sample(FILLER, rng.randint(3, 6))
        for t in chosen:
            words += rng.sample(KEYWORDS[t], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": chosen})
    rng.shuffle(rows)
    return rows
