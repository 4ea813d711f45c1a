"""Reduced precision for the frozen base (issue 17): served rows/s, agreement with float32, and
held-out macro-F1 on real sets, in one process.

1. Quality: on each real set (bench/realsets.py) one adapter is trained with default
   hyperparameters on the float32 base (as today). Its held-out texts are then served through the
   engine (slot pool + heads, as the service does) with the base in each precision; reported per
   set: the share of held-out texts whose predicted label equals the float32 path's, and the
   held-out macro-F1.
2. Speed: 32 random rank-8 adapters (query/key/value of every block) resident; a batch of 32 and
   of 128 real texts (fortunes), each row with its own adapter, through `engine.run` (tokenize,
   forward with the gathered LoRA, pool, heads) in each precision; rows/s, median of --runs,
   against the bare float32 base forward on the same tokens (the baseline, 1.00).

Precisions: `float32`; `bfloat16` base with the LoRA slots in bf16; `bfloat16` base with the LoRA
slots in float32 (`lora32`). Heads are float32 in every case. `-onepass`: the whole batch in one
padded pass instead of length-sorted chunks (`engine.length_chunks`, CPU only); the padding waste
of both is printed.

    apt-get install -y fortunes wordnet-base
    .venv/bin/python bench/precision.py [--sets topic glosses names] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsets
from quality import macro_f1
from serving import TARGETS, median_seconds, random_adapter, served

from loradock.adapters import tasks
from loradock.adapters.core.base import BaseModel, default_base_model_path
from loradock.adapters.serving import engine as engine_module
from loradock.adapters.serving.engine import Engine, ServedHead
from loradock.adapters.serving.slots import AdapterRef, SlotPool
from loradock.adapters.training.data import validate_rows
from loradock.adapters.training.hyperparameters import Hyperparameters
from loradock.adapters.training.trainer import Trainer

VARIANTS = {  # name: (base dtype, LoRA slot dtype, rows in length-sorted chunks)
    "float32": ("float32", torch.float32, True),
    "bfloat16": ("bfloat16", torch.bfloat16, True),
    "bfloat16+lora32": ("bfloat16", torch.float32, True),
    "float32-onepass": ("float32", torch.float32, False),
    "bfloat16-onepass": ("bfloat16", torch.bfloat16, False),
}


def padding_waste(lengths: list[int], chunks: list[list[int]]) -> float:
    """Share of the tokens a pass computes that are padding."""
    padded = sum(len(c) * max(lengths[i] for i in c) for c in chunks)
    return 1 - sum(lengths) / padded


def train_adapters(base: BaseModel, sets: list[str]) -> dict[str, dict]:
    out = {}
    for name in sets:
        train, test = realsets.SETS[name](0)
        data = validate_rows(train, tasks.get("classification"), max_rows=10**6,
                             max_text_chars=10**5)  # fmt: skip
        t0 = time.perf_counter()
        result = Trainer(base).run(data, Hyperparameters(seed=0))
        assert result.status == "succeeded", result.error
        print(f"  trained {name}: {len(train)} rows, serves {result.winner}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        out[name] = {"task": result.task, "weights": result.weights, "head": result.head,
                     "test": test}  # fmt: skip
    return out


def predict(engine: Engine, pool: SlotPool, name: str, adapter: dict) -> list[str]:
    res = pool.load(AdapterRef(name, 1), adapter["weights"],
                    ServedHead(adapter["task"], adapter["head"]))  # fmt: skip
    texts = [r["text"] for r in adapter["test"]]
    labels: list[str] = []
    for s in range(0, len(texts), 64):
        chunk = texts[s : s + 64]
        labels += [r.output["label"] for r in engine.run([res] * len(chunk), chunk)]
    return labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=["topic", "glosses", "names"])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument(
        "--train-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the base's dtype while the adapters train (float32: as today)",
    )
    args = p.parse_args()
    torch.set_num_threads(2)
    path = default_base_model_path()
    fp32 = BaseModel.load(path, dtype="float32")
    print(f"training one adapter per set on the {args.train_dtype} base", flush=True)
    trainer_base = fp32 if args.train_dtype == "float32" else BaseModel.load(path, dtype="bfloat16")
    adapters = train_adapters(trainer_base, args.sets)
    texts = [r["text"] for r in realsets.topic(0)[1]][:128]

    bare: dict[int, float] = {}
    for n in (32, 128):
        batch = fp32.tokenize(texts[:n])

        def forward(batch=batch) -> None:
            with torch.inference_mode():
                fp32.hidden_states(batch["input_ids"], batch["attention_mask"])

        bare[n] = n / median_seconds(forward, args.runs)

    chunker = engine_module.length_chunks

    def one_pass(lengths, **_) -> list[list[int]]:
        return [list(range(len(lengths)))]

    for n in (32, 128):
        lengths = [len(x) for x in fp32.encode(texts[:n])]
        whole, parts = padding_waste(lengths, one_pass(lengths)), chunker(lengths)
        print(f"padding waste at batch {n}: one pass {whole:.1%}, length-sorted chunks "
              f"{padding_waste(lengths, parts):.1%} ({len(parts)} chunks)")  # fmt: skip
    results: dict[str, dict] = {}
    reference: dict[str, list[str]] = {}
    for variant in args.variants:
        dtype, lora_dtype, chunked = VARIANTS[variant]
        engine_module.length_chunks = chunker if chunked else one_pass
        base = fp32 if dtype == "float32" else BaseModel.load(path, dtype=dtype)
        targets = sorted({*TARGETS, *base.default_target_modules()})
        pool = SlotPool(base, targets, max_rank=8, capacity=32 + len(args.sets),
                        lora_dtype=lora_dtype)  # fmt: skip
        engine = Engine(base, pool, store=None)  # type: ignore[arg-type]
        row: dict = {"sets": {}}
        for name, adapter in adapters.items():
            labels = predict(engine, pool, name, adapter)
            reference.setdefault(name, labels)
            truth = [r["label"] for r in adapter["test"]]
            agree = sum(a == b for a, b in zip(labels, reference[name], strict=True))
            row["sets"][name] = {
                "agreement": round(agree / len(labels), 4),
                "macro_f1": round(macro_f1(truth, labels), 4),
                "texts": len(labels),
            }
        residents = [
            pool.load(AdapterRef(f"ad_{i}", 1), random_adapter(base, i),
                      served(i, base.hidden_size))
            for i in range(32)
        ]  # fmt: skip
        for n in (32, 128):
            rows = [residents[i % 32] for i in range(n)]

            def run(rows=rows, n=n, engine=engine) -> None:
                engine.run(rows, texts[:n])

            times = []
            run()
            for _ in range(args.runs):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            rate = n / statistics.median(times)
            row[f"rows_per_s_{n}"] = round(rate, 1)
            row[f"vs_bare_fp32_{n}"] = round(rate / bare[n], 3)
            row[f"spread_{n}"] = [round(n / max(times), 1), round(n / min(times), 1)]
        results[variant] = row
        print(variant, json.dumps(row), flush=True)

    print(f"\nbare float32 base forward: {bare[32]:.1f} rows/s at batch 32, "
          f"{bare[128]:.1f} at batch 128 (median of {args.runs})")  # fmt: skip
    print(
        "| precision | rows/s b32 (x bare fp32) | rows/s b128 (x bare fp32) | "
        + " | ".join(f"{s}: agreement / macro-F1" for s in args.sets)
        + " |"
    )
    for variant, row in results.items():
        cells = " | ".join(f"{row['sets'][s]['agreement']:.2%} / {row['sets'][s]['macro_f1']:.4f}"
                           for s in args.sets)  # fmt: skip
        print(f"| {variant} | {row['rows_per_s_32']} ({row['vs_bare_fp32_32']}x) | "
              f"{row['rows_per_s_128']} ({row['vs_bare_fp32_128']}x) | {cells} |")  # fmt: skip


if __name__ == "__main__":
    main()
