"""Held-out multi-label quality on real data: which parts a hand-labelled name has (probablepeople's
tags: GivenName, Surname, CorporationLegalType, ...; bench/realsets.py `name_parts`).

Per seed, both models see the 600 training names only and are scored on 400 test names:
- ``ovr probe``: what a practitioner fits by hand: scikit-learn OneVsRestClassifier over
  LogisticRegression on the frozen base's mean-pooled embeddings, C from 1e-3..1e3 by 5-fold CV on
  micro-F1, predictions at 0.5;
- ``loradock``: Trainer with the multilabel task and default hyperparameters, the model it serves
  (LoRA or its probe) with its calibrated thresholds.
Scores: micro-F1 (the task's decision metric), macro-F1 and subset accuracy.

    .venv/bin/python bench/multilabel.py [--seeds 0 1 2] [--hp '{...}'] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsets

from loradock.adapters import tasks
from loradock.adapters.artifacts.files import AdapterModel
from loradock.adapters.core.base import BaseModel, default_base_model_path
from loradock.adapters.training.data import validate_rows
from loradock.adapters.training.trainer import Hyperparameters, Trainer


def scores(labels: list[str], truth: list[list[str]], predicted: list[list[str]]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    def hot(sets: list[list[str]]) -> np.ndarray:
        return np.array([[lbl in s for lbl in labels] for s in sets], dtype=bool)

    y, p = hot(truth), hot(predicted)
    return {
        "micro_f1": round(float(f1_score(y, p, average="micro", zero_division=0)), 4),
        "macro_f1": round(float(f1_score(y, p, average="macro", zero_division=0)), 4),
        "subset_accuracy": round(float(accuracy_score(y, p)), 4),
    }


def ovr_probe(base: BaseModel, labels: list[str], train: list[dict], test: list[dict]) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.multiclass import OneVsRestClassifier

    t0 = time.perf_counter()
    x_tr = base.embed([r["text"] for r in train]).float().cpu().numpy()
    x_te = base.embed([r["text"] for r in test]).float().cpu().numpy()
    y_tr = np.array([[lbl in r["labels"] for lbl in labels] for r in train], dtype=int)
    grid = GridSearchCV(
        OneVsRestClassifier(LogisticRegression(max_iter=5000)),
        {"estimator__C": np.logspace(-3, 3, 13)},
        cv=KFold(5, shuffle=True, random_state=0),
        scoring="f1_micro",
    )
    grid.fit(x_tr, y_tr)
    pred = grid.predict(x_te)
    predicted = [[lbl for j, lbl in enumerate(labels) if row[j]] for row in pred]
    out = scores(labels, [r["labels"] for r in test], predicted)
    out.update(
        C=float(grid.best_params_["estimator__C"]), seconds=round(time.perf_counter() - t0, 1)
    )
    return out


def run_loradock(base: BaseModel, train: list[dict], test: list[dict], seed: int, hp: dict):
    t0 = time.perf_counter()
    data = validate_rows(train, tasks.get("multilabel"), max_rows=10**6, max_text_chars=10**5)
    out = Trainer(base).run(data, Hyperparameters(seed=seed, **hp))
    assert out.status == "succeeded", out.error
    model = AdapterModel(meta={}, task=out.task, head=out.head, weights=out.weights)
    predictions = model.predict(base, [r["text"] for r in test])
    labels = out.task.labels
    result = scores(labels, [r["labels"] for r in test], [p["labels"] for p in predictions])
    calibration = out.report.get("calibration", {})
    result.update(
        served=out.winner,
        val_lora=out.metrics.get("val_micro_f1"),
        val_probe=out.baseline.get("val_micro_f1"),
        calibrated=calibration.get("applied"),
        cross_fitted=calibration.get("micro_f1_cross_fitted"),
        best_epoch=out.metrics.get("best_epoch"),
        seconds=round(time.perf_counter() - t0, 1),
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--hp", type=json.loads, default={})
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    base = BaseModel.load(default_base_model_path())
    results = {}
    for seed in args.seeds:
        train, test = realsets.name_parts(seed)
        labels = sorted({lbl for r in train for lbl in r["labels"]})
        r = {
            "train": len(train),
            "test": len(test),
            "labels": len(labels),
            "ovr_probe": ovr_probe(base, labels, train, test),
            "loradock": run_loradock(base, train, test, seed, args.hp),
        }
        results[seed] = r
        print(seed, json.dumps(r), flush=True)
    print("\nmodel | micro-F1 | macro-F1 | subset accuracy  (median over seeds)")
    for kind in ("ovr_probe", "loradock"):
        med = {
            k: statistics.median(results[s][kind][k] for s in args.seeds)
            for k in ("micro_f1", "macro_f1", "subset_accuracy")
        }
        print(f"{kind} | {med['micro_f1']:.4f} | {med['macro_f1']:.4f} | "
              f"{med['subset_accuracy']:.4f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
