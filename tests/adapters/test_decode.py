"""The generation engine on a tiny random Llama: a continuously batched decode loop whose rows
each carry their own adapter, checked row by row against the one-at-a-time path."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest
import torch

from loradock.adapters.core.base import BaseModel
from loradock.adapters.core.lora import LoRASpec, LoRAWeights
from loradock.adapters.serving.decode import (
    Admitted,
    EngineOverloaded,
    Failed,
    Finished,
    GenerationEngine,
    RequestTooLarge,
    Sequence,
    Token,
)
from loradock.adapters.serving.generation import (
    PromptTooLong,
    SamplingParams,
    generate,
    row_prompt,
)
from loradock.adapters.serving.slots import AdapterRef, BatchedLoRA, SlotPool

WORDS = "please help why how what refund login crash late password card package slow".split()


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return BaseModel.load(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="module")
def pool(llama):
    """Slots 1-3 hold three random adapters strong enough to change greedy output."""
    targets = llama.default_target_modules()
    pool = SlotPool(llama, targets, max_rank=4, capacity=4)
    shapes = {t.name: (t.in_features, t.out_features) for t in llama.linear_targets()
              if t.suffix in targets}  # fmt: skip
    pool.weights = []  # slot k + 1 holds weights[k]
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        w = LoRAWeights(LoRASpec(4, 8.0, 0.0, tuple(targets), None), shapes, generator=g)
        with torch.no_grad():
            for b in w.B:
                b.normal_(0, 0.5, generator=g)
        pool.load(AdapterRef(f"a{k}", 1), w)
        pool.weights.append(w)
    return pool


def prompt(llama, i: int, n: int = 4) -> list[int]:
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n)]
    return llama.tokenizer(" ".join(words))["input_ids"]


ORDER = itertools.count()


class Collector:
    """A sink: every event of one sequence, and an Event set when it ends."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.stamps: list[int] = []
        self.ended = threading.Event()
        self.released = 0

    def __call__(self, event: object) -> None:
        self.events.append(event)
        self.stamps.append(next(ORDER))  # a global order of every sink call
        if isinstance(event, Finished | Failed):
            self.ended.set()

    def release(self) -> None:
        self.released += 1

    @property
    def final(self) -> Finished | Failed:
        assert self.ended.wait(60), self.events
        return self.events[-1]  # type: ignore[return-value]

    @property
    def streamed(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Token))

    @property
    def token_ids(self) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, Token) and e.token_id >= 0]


def run(engine, prompts, params, slots=None, *, stagger: float = 0.0):
    slots = slots or [0] * len(prompts)
    out = []
    for ids, p, slot in zip(prompts, params, slots, strict=True):
        c = Collector()
        seq = Sequence(ids, p, slot=slot, sink=c, on_done=c.release)
        engine.prepare(seq)
        engine.submit([seq])
        out.append(c)
        if stagger:
            time.sleep(stagger)
    for c in out:
        assert isinstance(c.final, Finished), c.events
    return out


def alone(llama, pool, ids, params, slot):
    ctx = BatchedLoRA(pool, [slot]) if slot else None
    return generate(llama, ctx, ids, params)


def test_every_row_of_a_mixed_batch_equals_the_same_request_alone(llama, pool):
    engine = GenerationEngine(llama, pool, prefill_chunk=64)
    prompts = [prompt(llama, i, n=3 + i % 5) for i in range(12)]
    slots = [i % 4 for i in range(12)]  # the base and three adapters, interleaved
    params = [SamplingParams(max_tokens=4 + (i * 5) % 11, temperature=0) for i in range(12)]
    # Staggered: later requests join a batch that is already decoding; short ones leave early.
    got = run(engine, prompts, params, slots, stagger=0.01)
    for ids, p, slot, c in zip(prompts, params, slots, got, strict=True):
        ref = alone(llama, pool, ids, p, slot)
        assert c.token_ids == ref.token_ids, (slot, ids)
        assert c.final.text == ref.text
        assert c.streamed == ref.text  # the streamed pieces add up to the final text
        assert c.final.finish_reason == ref.finish_reason
        assert c.final.completion_tokens == len(ref.token_ids)
        assert isinstance(c.events[0], Admitted)
        assert c.released == 1
    assert engine.max_rows_seen > 1  # they really shared decode steps
    assert engine.steps < sum(p.max_tokens for p in params)
    assert engine.running() == 0
    assert engine.kv_tokens() == 0
    # adapters changed the output: the rows are not all the base's
    assert {tuple(c.token_ids) for c in got[1:4]} != {
        tuple(alone(llama, pool, ids, p, 0).token_ids)
        for ids, p in zip(prompts[1:4], params[1:4], strict=True)
    }


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(llama, pool):
    engine = GenerationEngine(llama, pool, prefill_chunk=4)
    long_ids = prompt(llama, 3, n=30)
    short = [prompt(llama, i, n=3) for i in range(3)]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)] * 3 + [
        SamplingParams(max_tokens=6, temperature=0)
    ]
    got = run(engine, [*short, long_ids], params, [1, 2, 0, 3])
    for ids, p, slot, c in zip([*short, long_ids], params, [1, 2, 0, 3], got, strict=True):
        assert c.token_ids == alone(llama, pool, ids, p, slot).token_ids
    assert engine.prefill_passes >= len(long_ids) // 4  # chunk by chunk
    # The running rows kept decoding while the long prompt was prefilled: between its admission
    # and its first token, each got a token per chunk (not one long stall).
    start = got[3].stamps[0]  # Admitted
    first = next(t for t, e in zip(got[3].stamps, got[3].events, strict=True)
                 if isinstance(e, Token))  # fmt: skip
    for c in got[:3]:
        during = [t for t, e in zip(c.stamps, c.events, strict=True)
                  if isinstance(e, Token) and start < t < first]  # fmt: skip
        assert len(during) >= len(long_ids) // 4 - 1


@pytest.mark.parametrize(("idle", "passes"), [(None, 1), (1, 4)])
def test_an_idle_engine_prefills_prompts_that_arrive_together_in_bigger_passes(
    llama, pool, idle, passes
):
    """The prefill chunk bounds the stall of running streams; with none running, up to
    `idle_prefill_tokens` (default 4 chunks) go in one pass. Same tokens either way."""
    prompts = [prompt(llama, i, n=6) for i in range(4)]
    width = max(len(p) for p in prompts)
    engine = GenerationEngine(llama, pool, prefill_chunk=width,
                              idle_prefill_tokens=idle and width)  # fmt: skip
    params = SamplingParams(max_tokens=5, temperature=0)
    sinks, seqs = [], []
    for i, ids in enumerate(prompts):
        c = Collector()
        seqs.append(Sequence(ids, params, slot=i % 3, sink=c, on_done=c.release))
        engine.prepare(seqs[-1])
        sinks.append(c)
    engine.submit(seqs)  # together, before the engine thread starts
    for i, (ids, c) in enumerate(zip(prompts, sinks, strict=True)):
        assert isinstance(c.final, Finished)
        assert c.token_ids == alone(llama, pool, ids, params, i % 3).token_ids
    assert engine.prefill_passes == passes
    engine.close()


def test_seeded_sampling_does_not_depend_on_the_batch(llama, pool):
    ids = prompt(llama, 5)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    engine = GenerationEngine(llama, pool)
    mates = [prompt(llama, i) for i in range(6)]
    mate_params = [SamplingParams(max_tokens=10, temperature=0.8, seed=i) for i in range(6)]
    got = run(engine, [ids, *mates], [p, *mate_params], [2, 0, 1, 2, 3, 0, 1])
    assert got[0].token_ids == alone(llama, pool, ids, p, 2).token_ids
    other = run(engine, [ids], [SamplingParams(max_tokens=10, temperature=1.0, seed=12)], [2])
    assert other[0].token_ids != got[0].token_ids


def test_stop_strings_are_cut_and_never_streamed(llama, pool):
    engine = GenerationEngine(llama, pool)
    ids = prompt(llama, 1)
    full = alone(llama, pool, ids, SamplingParams(max_tokens=12, temperature=0), 1)
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = f"{words[1]} {words[2]}"  # spans two tokens: held back until it cannot match
    (c,) = run(engine, [ids], [SamplingParams(max_tokens=12, temperature=0, stop=(stop,))], [1])
    assert c.final.finish_reason == "stop"
    assert c.final.text == full.text[: full.text.find(stop)]
    assert c.streamed == c.final.text
    # a stop token id ends the row at that token
    at_third = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(full.token_ids[2],))
    (t,) = run(engine, [ids], [at_third], [1])
    assert t.token_ids == full.token_ids[:2]
    assert t.final.finish_reason == "stop"


def test_logprobs_are_those_of_the_model(llama, pool):
    engine = GenerationEngine(llama, pool)
    ids = prompt(llama, 2)
    (c,) = run(engine, [ids], [SamplingParams(max_tokens=3, temperature=0, logprobs=2)], [0])
    first = next(e for e in c.events if isinstance(e, Token))
    with torch.inference_mode():
        logits = llama.lm(input_ids=torch.tensor([ids])).logits[0, -1].float()
    expected = torch.log_softmax(logits, -1)
    assert first.logprob is not None
    assert abs(first.logprob.logprob - float(expected.max())) < 1e-4
    assert len(first.logprob.top) == 2
    assert first.logprob.top[0][1] >= first.logprob.top[1][1]


def test_a_cancelled_row_leaves_at_once_and_releases_its_adapter(llama, pool):
    engine = GenerationEngine(llama, pool)
    c = Collector()
    first_token, cancelled = threading.Event(), threading.Event()

    def reader(event):  # the sink runs on the engine thread: hold it at the first token
        c(event)
        if isinstance(event, Token) and not first_token.is_set():
            first_token.set()
            assert cancelled.wait(30)

    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    seq = Sequence(prompt(llama, 0), params, slot=1, sink=reader, on_done=c.release)
    engine.prepare(seq)
    engine.submit([seq])
    assert first_token.wait(30)
    seq.cancel()  # the client goes away while its first token is being read
    cancelled.set()
    final = c.final
    assert isinstance(final, Failed)
    assert final.kind == "cancelled"
    assert c.released == 1
    assert len(c.token_ids) == 1  # no step ran for it after the cancel
    deadline = time.monotonic() + 10
    while engine.running():  # the row is dropped right after its end is reported
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_budgets_limits_and_the_queue_timeout(llama, pool):
    too_long = Sequence(list(range(3, 70)), SamplingParams(), sink=lambda e: None)
    with pytest.raises(PromptTooLong):
        GenerationEngine(llama, pool).prepare(too_long)
    engine = GenerationEngine(llama, pool, kv_budget_tokens=20, max_running=2, max_waiting=3)
    big = Sequence(prompt(llama, 0, n=8), SamplingParams(max_tokens=30), sink=lambda e: None)
    with pytest.raises(RequestTooLarge, match="KV_BUDGET"):
        engine.prepare(big)
    # max_tokens beyond the context is cut to what fits
    fits = Sequence(prompt(llama, 0), SamplingParams(max_tokens=1000), sink=lambda e: None)
    GenerationEngine(llama, pool).prepare(fits)
    assert fits.max_new == 64 - len(fits.prompt)
    # at most 2 rows (and 20 padded KV tokens) run at once; the rest wait their turn
    three = [prompt(llama, i, n=3) for i in range(3)]
    greedy = SamplingParams(max_tokens=6, temperature=0)
    got = run(engine, three, [greedy] * 3)
    assert engine.max_rows_seen == 2
    for ids, c in zip(three, got, strict=True):
        assert c.token_ids == alone(llama, pool, ids, greedy, 0).token_ids
    with pytest.raises(EngineOverloaded, match="LORADOCK_MAX_WAITING_GENERATIONS"):
        engine.submit([Sequence([1], SamplingParams(), sink=lambda e: None) for _ in range(4)])

    slow = GenerationEngine(llama, pool, max_running=1, queue_timeout=0.05)
    first, late = Collector(), Collector()

    def slow_reader(event):  # the sink runs on the engine thread: each token takes 10 ms
        first(event)
        time.sleep(0.01)

    long_run = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    a = Sequence(prompt(llama, 0), long_run, sink=slow_reader)
    b = Sequence(prompt(llama, 1), SamplingParams(max_tokens=5, temperature=0), sink=late,
                 on_done=late.release)  # fmt: skip
    for s in (a, b):
        slow.prepare(s)
    slow.submit([a, b])
    assert isinstance(late.final, Failed)
    assert late.final.kind == "overloaded"
    assert "LORADOCK_GENERATION_QUEUE_SECONDS" in late.final.message
    assert late.released == 1
    assert isinstance(first.final, Finished)


def test_the_prompt_embedding_is_the_one_the_reference_profile_computes(llama, pool):
    """Drift monitoring compares live prompts with the training prompts: the engine's prefill
    (batched or chunked) must pool exactly what the profile pools at publish time."""
    from loradock.adapters.artifacts.files import generation_profile
    from loradock.adapters.tasks.generation import Generation

    rows = [{"messages": [{"role": "user", "content": f"why {w} is late"},
                          {"role": "assistant", "content": "thanks billing"}]}
            for w in ("refund", "login password card")]  # fmt: skip
    profile, tensors = generation_profile(
        llama, Generation(["chat"]), pool.weights[1], [json.dumps(r) for r in rows]
    )
    assert profile["output_length_histogram"][0] == 2  # two-token answers
    assert profile["rows"] == 2
    for chunk in (64, 3):  # one prefill pass; and chunks of 3 tokens
        engine = GenerationEngine(llama, pool, prefill_chunk=chunk, idle_prefill_tokens=chunk)
        got = run(engine, [row_prompt(llama, r)[0] for r in rows],
                  [SamplingParams(max_tokens=2, temperature=0)] * 2, [2, 2])  # fmt: skip
        live = torch.stack([c.final.prompt_embedding for c in got])
        reference = tensors["embeddings"]
        # the profile samples its rows in a random order: match each live row to its nearest
        for row in live:
            assert torch.cdist(row[None], reference).min() < 1e-4
