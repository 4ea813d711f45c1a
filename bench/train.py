"""Training quality and speed on a real dataset (Debian fortunes categories), in one process.

For each seed: loradock's trainer with default hyperparameters (linear probe baseline, LoRA from a
regularized probe head, per-batch padding, early stopping) -> validation macro-F1 of LoRA, of the
probe, and of the served winner; seconds to a finished artifact.

Once (seed of --plain-seed): the loop a user would write by hand with peft + transformers: LoRA
(r=8, alpha=16, attention projections) + a linear head on mean-pooled output, AdamW lr 5e-4,
padding to a fixed 128 tokens, --plain-epochs epochs, validated after each epoch. The speed ratio
is the plain loop's time to first reach loradock's macro-F1 (within 0.02; or its whole run if it
never does) over loradock's time.

    apt-get install -y fortunes
    .venv/bin/python bench/train.py [--seeds 0 1 2] [--plain-epochs 10] [--hp '{"rank": 4}']
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fortunes import make_split
from models import encoder_path

from loradock.adapters import tasks
from loradock.adapters.artifacts.files import build_files
from loradock.adapters.core.base import BaseModel
from loradock.adapters.tasks.metrics import classification_metrics
from loradock.adapters.training import encoding
from loradock.adapters.training.data import validate_rows
from loradock.adapters.training.encoding import Encoded
from loradock.adapters.training.trainer import Hyperparameters, TrainCallbacks, Trainer


def run_loradock(base: BaseModel, train_rows, val_rows, seed: int, extra: dict) -> dict:
    t0 = time.perf_counter()
    task = tasks.get("classification")
    train = validate_rows(train_rows, task, max_rows=10**6, max_text_chars=10**5)
    val = validate_rows(
        val_rows, task, max_rows=10**6, max_text_chars=10**5, dataset="validation_data"
    )
    epochs = []
    out = Trainer(base).run(
        train,
        Hyperparameters(seed=seed, **extra),
        validation=val.examples,
        callbacks=TrainCallbacks(on_event=lambda e: e["type"] == "epoch" and epochs.append(e)),
    )
    assert out.status == "succeeded", out.error
    t_files = time.perf_counter()
    build_files(
        base=base,
        task=out.task,
        meta={},
        head=out.head,
        weights=out.weights,
        profile_texts=out.reference_texts,
    )
    seconds = time.perf_counter() - t0
    timings = out.report.get("timings", {})
    phases = {
        "embed": timings.get("embed_seconds"),
        "probe": out.baseline.get("seconds"),
        "epochs": round(sum(e.get("seconds", 0.0) for e in epochs), 1),
        "files": round(time.perf_counter() - t_files, 1),
    }
    return {
        "phases": phases,
        "seconds": round(seconds, 1),
        "lora_f1": out.metrics["val_macro_f1"],
        "probe_f1": out.baseline["val_macro_f1"],
        "served_f1": out.served_metrics()["val_macro_f1"],
        "winner": out.winner,
        "best_epoch": out.metrics["best_epoch"],
        "epochs_run": out.metrics["epochs_run"],
        "stop_reason": out.stop_reason,
        "history": [
            (e["epoch"], e["train_loss"], e["val_loss"], e["val_macro_f1"]) for e in epochs
        ],
    }


def run_plain(model_dir: Path, train_rows, val_rows, epochs: int, seed: int, target_f1: float):
    """What a user writes by hand: peft LoRA, fixed padding to 128, AdamW 5e-4, CE loss."""
    torch.manual_seed(seed)
    labels = sorted({r["label"] for r in train_rows})
    index = {lbl: i for i, lbl in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    )
    head = torch.nn.Linear(model.config.hidden_size, len(labels))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)

    def encode(rows):
        enc = tok(
            [r["text"] for r in rows], padding="max_length", truncation=True, max_length=128,
            return_tensors="pt",
        )  # fmt: skip
        y = torch.tensor([index[r["label"]] for r in rows])
        return enc["input_ids"], enc["attention_mask"], y

    def forward(ids, mask):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return head((hidden * m).sum(1) / m.sum(1))

    tr_ids, tr_mask, tr_y = encode(train_rows)
    va_ids, va_mask, va_y = encode(val_rows)
    t0 = time.perf_counter()
    reached = None
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(tr_y))
        losses = []
        for s in range(0, len(perm), 16):
            idx = perm[s : s + 16]
            loss = F.cross_entropy(forward(tr_ids[idx], tr_mask[idx]), tr_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        model.eval()
        with torch.inference_mode():
            logits = torch.cat(
                [forward(va_ids[s : s + 64], va_mask[s : s + 64]) for s in range(0, len(va_y), 64)]
            )
        m = classification_metrics(logits, va_y, labels)
        elapsed = time.perf_counter() - t0
        history.append((epoch, round(statistics.fmean(losses), 4), round(m["loss"], 4),
                        round(m["macro_f1"], 4), round(elapsed, 1)))  # fmt: skip
        print(f"  plain epoch {epoch}: {history[-1]}", flush=True)
        if reached is None and m["macro_f1"] >= target_f1 - 0.02:
            reached = elapsed
    total = time.perf_counter() - t0
    return {
        "seconds": round(total, 1),
        "best_f1": max(h[3] for h in history),
        "final_f1": history[-1][3],
        "seconds_to_target": round(reached, 1) if reached is not None else None,
        "history": history,
    }


def padding_report(base: BaseModel, rows: list[dict], batch_size: int) -> None:
    """Tokens per epoch with loradock's length-bucketed batches vs fixed padding to 128."""
    import random

    encoder = encoding.TrainingEncoder(base)
    enc = encoder.tokenize_texts([r["text"] for r in rows])
    batches = encoder.batches(Encoded(ids=enc), batch_size, random.Random(0))
    bucketed = sum(len(b) * max(len(enc[i]) for i in b) for b in batches)
    fixed = len(enc) * 128
    real = sum(len(x) for x in enc)
    print(
        f"tokens per epoch: real {real}, bucketed batches {bucketed} "
        f"({bucketed / real:.2f}x real), fixed 128 {fixed} ({fixed / bucketed:.1f}x bucketed)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--plain-epochs", type=int, default=10)
    p.add_argument("--plain-seed", type=int, default=0)
    p.add_argument("--no-plain", action="store_true")
    p.add_argument(
        "--hp", type=json.loads, default={}, help="hyperparameters as JSON, e.g. '{\"rank\": 4}'"
    )
    p.add_argument(
        "--no-cache", action="store_true", help="disable the frozen-block cache (to measure it)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--dtype", default="auto", help="the base's dtype: auto (the service default), float32, ..."
    )
    args = p.parse_args()
    extra = dict(args.hp)
    if args.no_cache:
        encoding.CACHE_BUDGET_BYTES = 0
    model_dir = encoder_path()
    base = BaseModel.load(model_dir, device="auto", dtype=args.dtype)
    print(f"base dtype {base.dtype}", flush=True)
    base.warm_up()
    results = {"loradock": {}, "plain": None}
    for seed in args.seeds:
        train_rows, val_rows = make_split(seed=seed)
        r = run_loradock(base, train_rows, val_rows, seed, extra)
        results["loradock"][seed] = r
        print(
            f"seed {seed}: loradock {r['seconds']}s  LoRA F1 {r['lora_f1']:.4f}  probe F1 "
            f"{r['probe_f1']:.4f}  served ({r['winner']}) {r['served_f1']:.4f}  best epoch "
            f"{r['best_epoch']}/{r['epochs_run']} ({r['stop_reason']})",
            flush=True,
        )
        print(f"    phases (s): {r['phases']}")
        for h in r["history"]:
            print(f"    epoch {h[0]}: train {h[1]:.4f}  val {h[2]:.4f}  F1 {h[3]:.4f}")
    padding_report(base, make_split(seed=args.seeds[0])[0], extra.get("batch_size", 16))
    runs = list(results["loradock"].values())
    lora_mean = statistics.fmean(r["lora_f1"] for r in runs)
    probe_mean = statistics.fmean(r["probe_f1"] for r in runs)
    served_mean = statistics.fmean(r["served_f1"] for r in runs)
    print(
        f"mean over seeds {args.seeds}: LoRA {lora_mean:.4f}  probe {probe_mean:.4f}  "
        f"LoRA - probe {lora_mean - probe_mean:+.4f}  served {served_mean:.4f}  "
        f"served >= probe on every seed: {all(r['served_f1'] >= r['probe_f1'] for r in runs)}"
    )
    if not args.no_plain:
        ours = results["loradock"][args.plain_seed]
        train_rows, val_rows = make_split(seed=args.plain_seed)
        plain = run_plain(
            model_dir, train_rows, val_rows, args.plain_epochs, args.plain_seed, ours["served_f1"]
        )
        results["plain"] = plain
        to_target = plain["seconds_to_target"] or plain["seconds"]
        reached = "reached" if plain["seconds_to_target"] is not None else "never reached"
        print(
            f"plain peft loop (seed {args.plain_seed}, padding 128, {args.plain_epochs} epochs): "
            f"{plain['seconds']}s, best F1 {plain['best_f1']:.4f}; {reached} loradock's "
            f"{ours['served_f1']:.4f} - 0.02 ({to_target}s)"
        )
        print(
            f"speed: loradock {ours['seconds']}s vs plain {to_target}s to the same macro-F1 -> "
            f"{to_target / ours['seconds']:.1f}x faster"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
