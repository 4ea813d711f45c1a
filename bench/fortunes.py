"""A real text-classification dataset from Debian's `fortunes` package (categories as labels).

apt-get install -y fortunes
"""

from __future__ import annotations

import random
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")


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
    cats = load_categories()
    need = train_per_class + val_per_class
    names = [c for c in sorted(cats, key=lambda c: -len(cats[c])) if c not in exclude]
    names = [c for c in names if len(cats[c]) >= need][:n_classes]
    rng = random.Random(seed)
    train, val = [], []
    for c in names:
        quotes = cats[c][:]
        rng.shuffle(quotes)
        train += [{"text": t, "label": c} for t in quotes[:train_per_class]]
        val += [{"text": t, "label": c} for t in quotes[train_per_class:need]]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val
