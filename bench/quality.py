"""Held-out quality on three real labelled sets (bench/realsets.py), in one process.

Per set and seed, every model sees the training rows only and is scored (macro-F1) on a test set
it never saw:
- ``probe``: the standard tuned baseline: scikit-learn LogisticRegression on the frozen base's mean
  pooled embeddings, C from 1e-3..1e3 by 5-fold stratified CV (macro-F1 scoring);
- ``plain``: the loop a user writes by hand with peft (LoRA r=8 on query/value + a linear head,
  AdamW 5e-4, batch 16, 10 epochs, the last epoch's model; bench/train.py's `run_plain`);
- ``setfit``: SetFit 1.2 with its paper defaults (contrastive pairs, then logistic regression),
  run from its own virtual environment (``--setfit-python``; see bench/setfit_run.py);
- ``loradock``: Trainer with default hyperparameters (or --hp), its own validation split, the
  served model (LoRA or its probe, as the version would serve it).

    apt-get install -y fortunes wordnet-base
    .venv/bin/python bench/quality.py [--sets topic glosses names] [--seeds 0] [--no-plain]
        [--no-probe] [--no-loradock] [--setfit-python /tmp/sfvenv/bin/python]
        [--hp '{"learning_rate": 1e-3}'] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsets
from models import encoder_path
from train import run_plain

from loradock.adapters import tasks
from loradock.adapters.artifacts.files import AdapterModel
from loradock.adapters.core.base import BaseModel
from loradock.adapters.training.data import validate_rows
from loradock.adapters.training.trainer import Hyperparameters, Trainer


def macro_f1(truth: list[str], predicted: list[str]) -> float:
    from sklearn.metrics import f1_score

    return round(float(f1_score(truth, predicted, average="macro")), 4)


def tuned_probe(base: BaseModel, train: list[dict], test: list[dict]) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    t0 = time.perf_counter()
    x_tr = base.embed([r["text"] for r in train]).float().cpu().numpy()
    x_te = base.embed([r["text"] for r in test]).float().cpu().numpy()
    grid = GridSearchCV(
        LogisticRegression(max_iter=5000),
        {"C": np.logspace(-3, 3, 13)},
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
        scoring="f1_macro",
    )
    grid.fit(x_tr, [r["label"] for r in train])
    f1 = macro_f1([r["label"] for r in test], list(grid.predict(x_te)))
    return {"f1": f1, "C": float(grid.best_params_["C"]), "seconds": time.perf_counter() - t0}


def run_loradock(base: BaseModel, train: list[dict], test: list[dict], seed: int, hp: dict):
    t0 = time.perf_counter()
    task = tasks.get("classification")
    data = validate_rows(train, task, max_rows=10**6, max_text_chars=10**5)
    out = Trainer(base).run(data, Hyperparameters(seed=seed, **hp))
    assert out.status == "succeeded", out.error
    model = AdapterModel(meta={}, task=out.task, head=out.head, weights=out.weights)
    predictions = model.predict(base, [r["text"] for r in test])
    return {
        "f1": macro_f1([r["label"] for r in test], [p["label"] for p in predictions]),
        "served": out.winner,
        "val_lora": out.metrics.get("val_macro_f1"),
        "val_probe": out.baseline.get("val_macro_f1"),
        "probe_C": out.baseline.get("C", out.baseline.get("l2")),
        "best_epoch": out.metrics.get("best_epoch"),
        "reason": out.winner_reason,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_setfit(python: str, name: str, seed: int, model_dir: Path) -> dict:
    """bench/setfit_run.py in SetFit's own environment (it pins its own library versions)."""
    script = Path(__file__).resolve().parent / "setfit_run.py"
    cmd = [python, str(script), "--set", name, "--seed", str(seed), "--model", str(model_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"setfit failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(realsets.SETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--no-plain", action="store_true")
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--no-loradock", action="store_true")
    p.add_argument("--setfit-python", default=None, help="a venv's python with setfit installed")
    p.add_argument("--plain-epochs", type=int, default=10)
    p.add_argument("--hp", type=json.loads, default={})
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--dtype", default="auto", help="the base's dtype (auto: the service's)")
    args = p.parse_args()
    torch.set_num_threads(2)
    model_dir = encoder_path()
    base = BaseModel.load(model_dir, dtype=args.dtype)
    print(f"base dtype {base.dtype}", flush=True)
    results: dict[str, dict] = {}
    for name in args.sets:
        for seed in args.seeds:
            train, test = realsets.SETS[name](seed)
            r: dict = {"train": len(train), "test": len(test)}
            if not args.no_probe:
                r["probe"] = tuned_probe(base, train, test)
            if not args.no_loradock:
                r["loradock"] = run_loradock(base, train, test, seed, args.hp)
            if not args.no_plain:
                plain = run_plain(model_dir, train, test, args.plain_epochs, seed, 2.0)
                r["plain"] = {"f1": plain["final_f1"], "seconds": plain["seconds"]}
            if args.setfit_python:
                r["setfit"] = run_setfit(args.setfit_python, name, seed, model_dir)
            results[f"{name}/{seed}"] = r
            print(name, seed, json.dumps(r), flush=True)
    print("\nset | tuned probe | plain peft LoRA | SetFit | loradock (served)")
    for name in args.sets:
        rs = [results[f"{name}/{s}"] for s in args.seeds]

        def med(key: str, rs: list[dict] = rs) -> str:
            vals = [r[key]["f1"] for r in rs if key in r]
            return f"{statistics.median(vals):.4f}" if vals else "-"

        served = ",".join(r["loradock"]["served"] for r in rs if "loradock" in r)
        print(
            f"{name} | {med('probe')} | {med('plain')} | {med('setfit')} | {med('loradock')} "
            f"({served})"
        )
    for name in args.sets:
        runs = [results[f"{name}/{s}"]["loradock"] for s in args.seeds
                if "loradock" in results[f"{name}/{s}"]]  # fmt: skip
        if runs:
            print(f"{name}: loradock mean macro-F1 {statistics.fmean(r['f1'] for r in runs):.4f}, "
                  f"mean seconds {statistics.fmean(r['seconds'] for r in runs):.1f}, best epochs "
                  f"{[r['best_epoch'] for r in runs]}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
