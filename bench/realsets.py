"""Three real labelled text sets that ship in packages, each as (train, test) rows, disjoint.

- ``topic``: Debian ``fortunes``, the quote's category (17 largest categories).
- ``glosses``: Debian ``wordnet-base``, a noun definition's lexicographer file (20 categories:
  noun.animal, noun.artifact, ...), labelled by WordNet's lexicographers.
- ``names``: the ``probablepeople`` sdist's hand-labelled names, person or company (2 classes,
  natural prevalence); its tags also give a multi-label set (``name_parts``: which parts a name
  has: GivenName, Surname, CorporationLegalType, ...).

    apt-get install -y fortunes wordnet-base
    bench/realsets.py fetches the probablepeople sdist from PyPI into ~/.cache/loradock-bench

Test rows are never seen by training (loradock makes its own validation split from train).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile
import urllib.request
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from fortunes import load_categories, per_class_split

WORDNET = Path("/usr/share/wordnet/data.noun")
CACHE = Path(os.environ.get("LORADOCK_BENCH_CACHE", Path.home() / ".cache" / "loradock-bench"))
# WordNet 3.0 lexicographer file numbers of the noun files (lexnames(5WN)).
NOUN_LEXNAMES = {
    4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
    10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location",
    16: "motive", 17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession",
    22: "process", 23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance",
    28: "time",
}  # fmt: skip


def topic(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Fortunes, 17 categories, 30 training and 15 test quotes each (510 / 255)."""
    return per_class_split(load_categories(), 17, 30, 15, seed)


def glosses(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """WordNet noun definitions, 20 lexicographer files, 25 train and 15 test each (500 / 300)."""
    if not WORDNET.is_file():
        raise SystemExit("wordnet-base not installed: apt-get install -y wordnet-base")
    pools: dict[str, list[str]] = defaultdict(list)
    for line in WORDNET.read_text(errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # the licence header
        fields, gloss = line.split("|", 1)
        lex = int(fields.split()[1])
        definition = gloss.split(";")[0].strip()  # the definition, without usage examples
        if lex in NOUN_LEXNAMES and 20 <= len(definition) <= 300:
            pools[NOUN_LEXNAMES[lex]].append(definition)
    return per_class_split(pools, 20, 25, 15, seed)


def _name_parts_data() -> list[tuple[str, str, list[list[str]]]]:
    """(text, person|company, [[tag, text], ...] in order, empty parts included) of every
    labelled name in the probablepeople sdist (fetched from PyPI once, cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / "probablepeople-parts.json"
    if not target.exists():
        with urllib.request.urlopen("https://pypi.org/pypi/probablepeople/json") as r:
            info = json.load(r)
        url = next(u["url"] for u in info["urls"] if u["packagetype"] == "sdist")
        with urllib.request.urlopen(url) as r:  # noqa: S310 (an https URL from PyPI's JSON)
            blob = r.read()
        rows = []
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            for member in tar.getmembers():
                m = re.search(r"name_data/labeled/(person|company)_labeled\.xml$", member.name)
                if not m:
                    continue
                f = tar.extractfile(member)
                assert f is not None
                root = ET.fromstring(f.read())  # noqa: S314 (the sdist's own data files)
                for name in root.iter("Name"):
                    parts = [[el.tag, (el.text or "").strip()] for el in name]
                    text = " ".join(t for _, t in parts if t)
                    if text:
                        rows.append((text, m.group(1), parts))
        target.write_text(json.dumps(rows))
    return [tuple(r) for r in json.loads(target.read_text())]  # type: ignore[misc]


def _name_data() -> list[tuple[str, str, list[str]]]:
    """(text, person|company, sorted part tags) of every labelled name in probablepeople."""
    return [(text, kind, sorted({tag for tag, _ in parts}))
            for text, kind, parts in _name_parts_data()]  # fmt: skip


def names(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """probablepeople names, person or company, 400 training and 300 test, natural prevalence."""
    seen: dict[str, str] = {}
    for text, kind, _ in _name_data():
        seen.setdefault(text, kind)
    items = sorted(seen.items())
    random.Random(seed).shuffle(items)
    rows = [{"text": t, "label": k} for t, k in items]
    return rows[:400], rows[400:700]


def name_parts(seed: int = 0, min_count: int = 30) -> tuple[list[dict], list[dict]]:
    """Multi-label: which parts (tags with >= min_count names) a name has; 600 train, 400 test."""
    data = {}
    for text, _, tags in _name_data():
        data.setdefault(text, tags)
    counts: dict[str, int] = defaultdict(int)
    for tags in data.values():
        for t in tags:
            counts[t] += 1
    keep = {t for t, c in counts.items() if c >= min_count}
    items = sorted((t, [x for x in tags if x in keep]) for t, tags in data.items())
    items = [(t, tags) for t, tags in items if tags]
    random.Random(seed).shuffle(items)
    rows = [{"text": t, "labels": tags} for t, tags in items]
    return rows[:600], rows[600:1000]


NAME_SYSTEM = (
    "Split the name into its labelled parts. Answer with one JSON object mapping each part's "
    "label (GivenName, Surname, MiddleName, MiddleInitial, FirstInitial, PrefixMarital, "
    "PrefixOther, SuffixGenerational, SuffixOther, Nickname, CorporationName, "
    "CorporationLegalType, CorporationNameOrganization, ...) to its text."
)


def name_json(seed: int = 0, train: int = 300, test: int = 100) -> tuple[list[dict], list[dict]]:
    """Generation: a name -> the JSON object of its labelled parts (tags in order, repeated tags
    joined by a space), as chat rows; `train` training and `test` held-out names."""
    data: dict[str, list[list[str]]] = {}
    for text, _, parts in _name_parts_data():
        data.setdefault(text, parts)
    items = sorted(data.items())
    random.Random(seed).shuffle(items)
    rows = []
    for text, parts in items[: train + test]:
        answer: dict[str, str] = {}
        for tag, value in (p for p in parts if p[1]):
            answer[tag] = f"{answer[tag]} {value}" if tag in answer else value
        rows.append({"messages": [
            {"role": "system", "content": NAME_SYSTEM},
            {"role": "user", "content": text},
            {"role": "assistant", "content": json.dumps(answer)},
        ]})  # fmt: skip
    return rows[:train], rows[train:]


SETS = {"topic": topic, "glosses": glosses, "names": names}
