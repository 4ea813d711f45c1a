"""Serving many adapters: mixed-batch throughput, hot-load time and memory per resident adapter.

All in one process on the default base model, with random LoRA weights (r=8 on query/key/value of
every block: the default training targets) so that every adapter really changes the output.

1. Mixed batch: 32 rows, each with a different adapter, through
   - the bare base model (no adapters): the baseline, ratio 1.0;
   - loradock's engine (slot pool + gathered bmm per layer);
   - peft's own mixed-batch inference (`adapter_names=`) with the same 32 adapters;
   - a naive loop: `set_adapter` and a forward per row (what per-request adapters cost).
2. Hot load: making a stored adapter servable (read + verify files, copy into a slot) with 1, 100
   and 1000 adapters already resident; peft's `load_adapter` for comparison at small counts.
3. Capacity: pool bytes per adapter slot vs the adapter's own parameter bytes.

    .venv/bin/python bench/serving.py [--runs 20] [--skip-peft-load]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fortunes import load_categories
from models import encoder_path

from loradock.adapters.artifacts import files as artifacts
from loradock.adapters.artifacts.store import LocalStore
from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel
from loradock.adapters.serving.engine import Engine, ServedHead
from loradock.adapters.serving.slots import AdapterRef, BatchedLoRA, SlotPool
from loradock.adapters.tasks.classification import Classification
from loradock.adapters.tasks.probe import LinearHead

TARGETS = ("query", "key", "value")


def random_adapter(base: BaseModel, seed: int, rank: int = 8) -> lora.LoRAWeights:
    spec = lora.LoRASpec(rank, 16.0, 0.0, TARGETS, None)
    names = lora.select_targets([t.name for t in base.linear_targets()], TARGETS, None)
    shapes = {
        t.name: (t.in_features, t.out_features) for t in base.linear_targets() if t.name in names
    }
    g = torch.Generator().manual_seed(seed)
    w = lora.LoRAWeights(spec, shapes, generator=g)
    with torch.no_grad():
        for b in w.B:
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    return w.eval().requires_grad_(False)


def head(seed: int, hidden: int, out: int = 5) -> LinearHead:
    g = torch.Generator().manual_seed(seed)
    return LinearHead(torch.randn(out, hidden, generator=g) * 0.1, torch.zeros(out))


def served(seed: int, hidden: int, out: int = 5) -> ServedHead:
    return ServedHead(Classification([f"c{i}" for i in range(out)]), head(seed, hidden, out))


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mixed_batch(base: BaseModel, texts: list[str], runs: int, distinct: int | None = None,
                peft: bool = True) -> None:  # fmt: skip
    """`distinct` adapters (default: one per row) spread over the rows round-robin."""
    n = len(texts)
    k = min(distinct or n, n)
    weights = [random_adapter(base, s) for s in range(k)]
    pool = SlotPool(base, TARGETS, max_rank=8, capacity=k)
    loaded = [
        pool.load(AdapterRef(f"ad_{i}", 1), w, served(i, base.hidden_size))
        for i, w in enumerate(weights)
    ]  # fmt: skip
    residents = [loaded[i % k] for i in range(n)]
    engine = Engine(base, pool, store=None)  # type: ignore[arg-type]
    batch = base.tokenize(texts)

    def bare() -> None:
        with torch.inference_mode():
            base.hidden_states(batch["input_ids"], batch["attention_mask"])

    def ours_forward() -> None:
        with torch.inference_mode(), lora.active(BatchedLoRA(pool, [r.slot for r in residents])):
            base.hidden_states(batch["input_ids"], batch["attention_mask"])

    def ours_engine() -> None:
        engine.run(residents, texts)

    def bare_embed() -> None:
        base.embed(texts, batch_size=len(texts))

    t_bare = median_seconds(bare, runs)
    t_bare_embed = median_seconds(bare_embed, runs)
    t_ours = median_seconds(ours_forward, runs)
    t_engine = median_seconds(ours_engine, runs)
    tokens = int(batch["attention_mask"].sum())
    rows = [
        ("bare base forward (baseline)", t_bare),
        ("loradock batched LoRA forward", t_ours),
        ("bare base embed (tokenize + forward + pool)", t_bare_embed),
        ("loradock engine.run (tokenize, fwd, heads)", t_engine),
    ]
    note = ""
    if peft:
        t_peft, t_loop, diff, effect = peft_times(base, weights, pool, residents, batch, runs)
        rows += [("peft adapter_names= mixed batch", t_peft),
                 ("peft set_adapter loop, row by row", t_loop)]  # fmt: skip
        note = f" (max |peft - loradock| = {diff:.2e}; max |adapted - bare| = {effect:.2e})"
    print(f"mixed batch on {base.device}/{base.dtype}: {n} rows, {k} distinct adapters, "
          f"{tokens} tokens, median of {runs} runs{note}")  # fmt: skip
    for label, t in rows:
        print(f"  {label:44s} {t * 1000:8.1f} ms  throughput ratio vs base {t_bare / t:.3f}")
    print(f"  engine.run vs bare embed (both tokenize and pool): {t_bare_embed / t_engine:.3f}")


def peft_times(base, weights, pool, residents, batch, runs) -> tuple[float, float, float, float]:
    """peft with the same adapters in one PeftModel on a separate copy of the base: seconds of its
    mixed batch (`adapter_names=`) and of a `set_adapter` loop row by row; and max |peft -
    loradock| and max |adapted - bare| over the batch's hidden states."""
    n, k = len(residents), len(weights)
    ref = BaseModel.load(base.path, device=str(base.device))
    cfg = weights[0].peft_config(str(base.path))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=cfg["target_modules"], lora_dropout=0.0)
    model = get_peft_model(ref.backbone, config, adapter_name="a0")
    set_peft_model_state_dict(model, weights[0].peft_state_dict(), adapter_name="a0")
    for i in range(1, k):
        model.add_adapter(f"a{i}", config)
        set_peft_model_state_dict(model, weights[i].peft_state_dict(), adapter_name=f"a{i}")
    model.eval()
    names = [f"a{i % k}" for i in range(n)]

    def peft_mixed() -> None:
        with torch.inference_mode():
            model(**batch, adapter_names=names)

    def peft_loop() -> None:
        with torch.inference_mode():
            for i in range(n):
                model.set_adapter(names[i])
                model(
                    input_ids=batch["input_ids"][i : i + 1],
                    attention_mask=batch["attention_mask"][i : i + 1],
                )

    t_peft = median_seconds(peft_mixed, runs)
    t_loop = median_seconds(peft_loop, max(3, runs // 4))
    # correctness of the comparison: every row agrees between peft and loradock
    with torch.inference_mode():
        theirs = model(**batch, adapter_names=names).last_hidden_state
        with lora.active(BatchedLoRA(pool, [r.slot for r in residents])):
            mine = base.hidden_states(batch["input_ids"], batch["attention_mask"])
        plain = base.hidden_states(batch["input_ids"], batch["attention_mask"])
    diff = (theirs - mine).abs().max().item()
    effect = (theirs - plain).abs().max().item()
    return t_peft, t_loop, diff, effect


def hot_load(base: BaseModel, counts: list[int], samples: int, peft_counts: list[int]) -> None:
    biggest = max(counts)
    with tempfile.TemporaryDirectory() as d:
        store = LocalStore(Path(d) / "store")
        proto = random_adapter(base, 0)
        files = artifacts.build_files(
            base=base, task=Classification(["a", "b"]), meta={},
            head=head(0, base.hidden_size, 2), weights=proto, profile_texts=[],
        )  # fmt: skip
        for i in range(biggest + samples):
            store.publish(f"t/ad_{i}/v1", files)
        pool = SlotPool(base, TARGETS, max_rank=8, capacity=biggest + samples + 1)
        engine = Engine(base, pool, store)
        loaded = 0
        print(f"hot load (read + verify + copy into a slot), p50 of {samples} loads:")
        for count in counts:
            while loaded < count:
                engine.release(
                    [engine.acquire(AdapterRef(f"ad_{loaded}", 1, key=f"t/ad_{loaded}/v1"))]
                )
                loaded += 1
            times = []
            for _ in range(samples):
                t0 = time.perf_counter()
                res = engine.acquire(AdapterRef(f"ad_{loaded}", 1, key=f"t/ad_{loaded}/v1"))
                times.append(time.perf_counter() - t0)
                engine.release([res])
                loaded += 1
            print(f"  {count:5d} resident: p50 {statistics.median(times) * 1000:6.2f} ms  "
                  f"p90 {sorted(times)[int(0.9 * len(times))] * 1000:6.2f} ms")  # fmt: skip
        if not peft_counts:
            return
        # peft for comparison: load_adapter from a PEFT directory into one PeftModel
        adir = Path(d) / "peft"
        adir.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (adir / name).write_bytes(files[name])
        ref = BaseModel.load(base.path, device=str(base.device))
        model = PeftModel.from_pretrained(ref.backbone, adir, adapter_name="p0")
        have = 1
        for count in peft_counts:
            while have < count:
                model.load_adapter(adir, adapter_name=f"p{have}")
                have += 1
            times = []
            for _ in range(max(3, samples // 4)):
                t0 = time.perf_counter()
                model.load_adapter(adir, adapter_name=f"p{have}")
                times.append(time.perf_counter() - t0)
                have += 1
            print(f"  peft load_adapter with {count:4d} loaded: p50 "
                  f"{statistics.median(times) * 1000:7.2f} ms")  # fmt: skip


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def capacity(base: BaseModel, n: int) -> None:
    w = random_adapter(base, 0)
    params = sum(p.numel() * p.element_size() for p in w.parameters())
    head_bytes = base.hidden_size * 5 * 4 + 5 * 4
    rss0 = rss_bytes()
    pool = SlotPool(base, TARGETS, max_rank=8, capacity=n)
    for i in range(n):
        pool.load(AdapterRef(f"ad_{i}", 1), w, served(i, base.hidden_size))  # fmt: skip
    rss1 = rss_bytes()
    per_slot = pool.bytes_per_slot()
    print(f"capacity: {pool.resident()} adapters resident (r=8, query/key/value, 6 blocks)")
    print(f"  adapter LoRA parameter bytes {params}, + head {head_bytes}")
    print(
        f"  pool bytes per slot {per_slot}: {per_slot / params:.3f}x the LoRA parameters; "
        f"with the head {(per_slot + head_bytes) / (params + head_bytes):.3f}x"
    )
    print(
        f"  process RSS grew {(rss1 - rss0) / 2**20:.0f} MiB for {n} adapters "
        f"({(rss1 - rss0) / n / (params + head_bytes):.2f}x their parameter bytes)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 100, 1000])
    p.add_argument("--peft-counts", type=int, nargs="*", default=[1, 100, 300])
    p.add_argument("--capacity", type=int, default=1000)
    p.add_argument(
        "--adapters",
        type=int,
        nargs="+",
        default=[0],
        help="distinct adapters in the mixed batch (0: one per row)",
    )
    p.add_argument("--no-peft", action="store_true", help="skip the peft comparisons")
    p.add_argument("--dtype", default="float32", help="the base's dtype (auto: the service's)")
    p.add_argument("--samples", type=int, default=20, help="hot loads per resident count")
    p.add_argument(
        "--parts", nargs="+", default=["capacity", "mixed", "load"],
        help="capacity runs first: RSS growth is only meaningful in a fresh process",
    )  # fmt: skip
    args = p.parse_args()
    torch.manual_seed(0)
    base = BaseModel.load(encoder_path(), device="auto", dtype=args.dtype)
    base.warm_up()
    quotes = [q for qs in load_categories().values() for q in qs]
    texts = quotes[:: max(1, len(quotes) // args.rows)][: args.rows]
    print(f"base: {base.path.name} on {base.device}, torch threads {torch.get_num_threads()}")
    if "capacity" in args.parts:
        capacity(base, args.capacity)
    if "mixed" in args.parts:
        for distinct in args.adapters:
            mixed_batch(base, texts, args.runs, distinct or None, peft=not args.no_peft)
    if "load" in args.parts:
        hot_load(base, args.counts, args.samples, [] if args.no_peft else args.peft_counts)


if __name__ == "__main__":
    main()
