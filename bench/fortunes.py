"""A real text-classification dataset from Debian's `fortunes` package (categories as labels).

apt-get install -y fortunes
"""

from __future__ import annotations

import os
import random
from pathlib import Path

FORTUNES = Path(os.environ.get("LORADOCK_BENCH_FORTUNES", "/usr/share/games/fortunes"))


def load_categories(max_chars: int = 400) -> dict[str, list[str]]:
    """Quotes per category (files without extension), whitespace-normalised, at most max_chars."""
    if not FORTUNES.is_dir():
        raise SystemExit("fortunes not installed: apt-get install -y fortunes")
    out: dict[str, list[str]] = {}
    for f in sorted(FORTUNES.iterdir()):
        if f.suffix or not f.is_file():
            continue
        quotes = []
        for chunk in f.read_text(errors="replace").split("\n%\n"):
            text = " ".join(chunk.split())
            if 20 <= len(text) <= max_chars:
                quotes.append(text)
        if quotes:
            out[f.name] = sorted(set(quotes))
    return out


def make_split(
    n_classes: int = 17,
    train_per_class: int = 30,
    val_per_class: int = 10,
    seed: int = 0,
    exclude: tuple[str, ...] = (),
) -> tuple[list[dict], list[dict]]:
    """Rows {"text","label"} from the n_classes largest categories, disjoint train/validation."""
    cats = {c: quotes for c, quotes in load_categories().items() if c not in exclude}
    return per_class_split(cats, n_classes, train_per_class, val_per_class, seed)


def per_class_split(
    pools: dict[str, list[str]], n_classes: int, first: int, second: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """Rows {"text","label"} of the n_classes largest pools that hold first + second distinct
    texts: `first` per class in one part, the next `second` in the other, both shuffled."""
    need = first + second
    names = [c for c in sorted(pools, key=lambda c: (-len(pools[c]), c)) if len(pools[c]) >= need]
    rng = random.Random(seed)
    one, two = [], []
    for c in names[:n_classes]:
        texts = sorted(set(pools[c]))
        rng.shuffle(texts)
        one += [{"text": t, "label": c} for t in texts[:first]]
        two += [{"text": t, "label": c} for t in texts[first:need]]
    rng.shuffle(one)
    rng.shuffle(two)
    return one, two
