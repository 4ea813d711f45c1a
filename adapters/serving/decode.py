"""The generation engine: continuous batching of many adapters' sequences on the shared causal LM.

One engine thread runs an iteration-level scheduler, as vLLM and TGI do:

    loop:  admit waiting sequences (within the row and KV-token budgets)
           one prefill chunk (up to `prefill_chunk` prompt tokens: several short prompts in one
               left-padded pass, or the next chunk of one long prompt)
           one decode step for every running sequence (one token each)

so new requests join the running batch between decode steps, finished ones leave it at once, and
a long prompt is prefilled a chunk at a time, between the others' tokens, instead of freezing
every stream. The chunk bounds that stall; with no stream running there is nothing to stall, so
an idle engine prefills up to `idle_prefill_tokens` (default 4 chunks) per pass: bigger passes
use the hardware better (8 prompts arriving at once on the CPU: one pass instead of four).

Each row carries its own adapter slot (slot 0 = the base): the decode step is one forward pass
of the base with `BatchedLoRA` gathering every row's A/B (the BGMV formulation).

The running batch's KV cache is left-padded, per layer [rows, kv_heads, width, head_dim], with an
attention mask and per-row positions kept on the host (no device sync to know them). A row that
joins is left-padded to the batch's width (or the batch to its); a row that leaves is dropped with
one `index_select`, and pad columns nobody needs any more are cut off. Greedy output of a row does
not depend on its batch-mates beyond floating-point noise (padding is masked; positions are the
row's own).

Per-row sampling: `temperature` (0 = greedy), `top_p`, `max_tokens`, `stop` strings (never
returned; a streamed text holds back what could still become one), `stop_token_ids` (besides the
model's end-of-sequence ids), `seed` (a private generator per row) and `logprobs`. The only host
sync per step is reading the sampled ids (and the log-probabilities of rows that asked for them).

The engine is protocol-free: a `Sequence`'s `sink` receives `Admitted`, `Token`, `Finished` or
`Failed` events on the engine thread; the service turns them into OpenAI's shapes.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from opentelemetry import trace

from loradock.adapters.core import lora
from loradock.adapters.core.base import (
    BaseModel,
    cache_argument,
    cache_of,
    cache_tensors,
    new_cache,
)
from loradock.adapters.core.scheduling import PriorityGate
from loradock.adapters.core.tracing import tracer
from loradock.adapters.serving.generation import (
    PromptTooLong,
    SamplingParams,
    context_length,
    draw,
    stop_token_ids,
)
from loradock.adapters.serving.slots import BatchedLoRA, SlotPool

log = logging.getLogger(__name__)

# --- events a sequence's sink receives ------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Admitted:
    """The sequence left the queue: its prefill starts."""


@dataclass(frozen=True)
class Token:
    """New text (may be empty while a multi-byte character or a possible stop string is
    incomplete) for one generated token."""

    text: str
    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end token, stop string or stop token id) or "length"
    text: str  # the whole generated text (stop string excluded)
    prompt_tokens: int
    completion_tokens: int
    # The prompt's mean-pooled last hidden state under the row's adapter ([hidden] float32 on
    # the CPU), computed during prefill: what drift monitoring compares with the training prompts.
    prompt_embedding: torch.Tensor | None = None


@dataclass(frozen=True)
class Failed:
    message: str
    kind: str = "internal"  # "overloaded" (queue wait), "shutdown", "internal"


Event = Admitted | Token | Finished | Failed


class EngineMetrics(Protocol):
    """What the engine reports (the service's Prometheus metrics implement it)."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, prompt_tokens: int, completion_tokens: int) -> None: ...
    def ended(self, reason: str) -> None: ...
    def state(self, running: int, waiting: int, kv_tokens: int, kv_budget: int) -> None: ...


class EngineOverloaded(RuntimeError):
    """Too many sequences are waiting already."""


class RequestTooLarge(ValueError):
    """prompt + max_tokens cannot fit the KV budget even alone."""


# --- one sequence ---------------------------------------------------------------------------------

_ids = itertools.count(1)


class _Detokenizer:
    """Incremental detokenization with stop strings (the prefix/read-offset method of TGI and
    vLLM): `push` appends a token and returns text safe to emit now; text that could still be
    the start of a stop string is held back until it cannot."""

    def __init__(self, tokenizer: Any, stops: Seq[str]) -> None:
        self.tok = tokenizer
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""
        self.sent = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            start = len(self.text)
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            if self.stops:
                self._find_stop(max(0, start - self.hold))
        if self.stopped:
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self.hold if self.stops else len(self.text))

    def _find_stop(self, since: int) -> None:
        cut = min((i for s in self.stops if (i := self.text.find(s, since)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out

    def finish(self) -> str:
        """The rest of the text, at the end: the full decode (what a one-shot decode gives), cut
        at a stop string."""
        if not self.stopped:
            full = self._decode(self.ids)
            if full.startswith(self.text[: self.sent]):
                self.text = full
            if self.stops:
                self._find_stop(0)
        return self._emit(len(self.text))


class Sequence:
    """One generation (one choice of a request) as the engine tracks it."""

    def __init__(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams,
        *,
        slot: int = 0,
        sink: Callable[[Event], None],
        on_done: Callable[[], None] | None = None,
        tag: Any = None,
    ) -> None:
        self.id = next(_ids)
        self.prompt = list(prompt_ids)
        self.params = params
        self.slot = slot
        self.sink = sink
        self.on_done = on_done
        self.tag = tag  # the caller's (e.g. its adapter and choice index)
        self.out: list[int] = []
        self.max_new = params.max_tokens
        self.generator: torch.Generator | None = None
        self.detok: _Detokenizer | None = None
        self.stop_ids: frozenset[int] = frozenset()
        self.cancelled = False
        self.done = False
        self.prefilled = 0  # prompt tokens already in a (partial) cache
        self.embedding: torch.Tensor | None = None  # the prompt's pooled hidden state
        self.enqueued = time.perf_counter()
        self.last_token_at: float | None = None
        # The caller's span (its HTTP request), linked from the prefill pass that starts it.
        self.trace_context = trace.get_current_span().get_span_context()

    def cancel(self) -> None:
        """The client went away: the engine drops the row at its next step (thread-safe)."""
        self.cancelled = True

    @property
    def reserved(self) -> int:
        """KV entries this sequence may need at most."""
        return len(self.prompt) + self.max_new


# --- the running batch ----------------------------------------------------------------------------


@dataclass
class _Batch:
    """Rows with a filled, left-padded KV cache, each with its next input token pending."""

    seqs: list[Sequence]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [B, kv_heads, width, head_dim]
    mask: torch.Tensor  # [B, width] long: 1 = a real KV entry
    lengths: list[int]  # real KV entries per row (= the next token's position)
    pending: torch.Tensor  # [B] long: each row's sampled, not yet fed token
    ctx: BatchedLoRA | None = field(default=None)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _merge(a: _Batch | None, b: _Batch) -> _Batch:
    if a is None:
        return b
    width = max(a.width, b.width)
    kv = [
        (
            torch.cat([_pad_left(ka, width, 2), _pad_left(kb, width, 2)]),
            torch.cat([_pad_left(va, width, 2), _pad_left(vb, width, 2)]),
        )
        for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True)
    ]
    mask = torch.cat([_pad_left(a.mask, width, 1), _pad_left(b.mask, width, 1)])
    return _Batch(
        seqs=a.seqs + b.seqs,
        kv=kv,
        mask=mask,
        lengths=a.lengths + b.lengths,
        pending=torch.cat([a.pending, b.pending]),
    )


def _select(batch: _Batch, keep: list[int]) -> _Batch | None:
    """The batch with only rows `keep`, and pad columns nobody uses any more cut off."""
    if not keep:
        return None
    if len(keep) == len(batch.seqs):
        return batch
    lengths = [batch.lengths[i] for i in keep]
    cut = batch.width - max(lengths)  # leading columns that are padding in every kept row
    idx = torch.tensor(keep, dtype=torch.long).to(batch.mask.device, non_blocking=True)
    kv = [
        (k.index_select(0, idx)[:, :, cut:], v.index_select(0, idx)[:, :, cut:])
        for k, v in batch.kv
    ]
    return _Batch(
        seqs=[batch.seqs[i] for i in keep],
        kv=kv,
        mask=batch.mask.index_select(0, idx)[:, cut:],
        lengths=lengths,
        pending=batch.pending.index_select(0, idx),
    )


# --- sampling -------------------------------------------------------------------------------------


def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, list[Any]]:
    """Next tokens [B] (on the device) for last-position logits [B, vocab], each row by its own
    parameters; and, for rows that asked, (chosen logprob, top ids, top logprobs) tensors."""
    greedy = logits.argmax(-1)
    sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    tokens = greedy
    if sampled:
        tokens = greedy.clone()
        for i in sampled:  # a row's draw uses its own generator: batch-mates never change it
            tokens[i] = draw(logits[i], seqs[i].params, seqs[i].generator)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    extra: list[Any] = [None] * len(seqs)
    if want:
        idx = torch.tensor(want, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, idx).view(-1, 1)).view(-1)
        k = max(int(seqs[i].params.logprobs or 0) for i in want)
        top_lp, top_id = lp.topk(max(k, 1), dim=-1)
        for j, i in enumerate(want):
            extra[i] = (chosen[j], top_id[j], top_lp[j])
    return tokens, extra


# --- the engine -----------------------------------------------------------------------------------


class GenerationEngine:
    """Continuous batching over a causal-LM base; one engine thread, started on first use."""

    def __init__(
        self,
        base: BaseModel,
        pool: SlotPool,
        *,
        gate: PriorityGate | None = None,
        max_running: int = 64,
        kv_budget_tokens: int = 65536,
        prefill_chunk: int = 512,
        idle_prefill_tokens: int | None = None,
        max_waiting: int = 256,
        queue_timeout: float = 30.0,
        metrics: EngineMetrics | None = None,
    ) -> None:
        if base.lm is None:
            raise ValueError("the generation engine needs a causal-LM base")
        self.base = base
        self.lm = base.lm
        self.pool = pool
        self.gate = gate or PriorityGate()
        self.max_running = max_running
        self.kv_budget = kv_budget_tokens
        self.prefill_chunk = max(1, prefill_chunk)
        self.idle_prefill_tokens = max(self.prefill_chunk, idle_prefill_tokens or 4 * prefill_chunk)
        self.max_waiting = max_waiting
        self.queue_timeout = queue_timeout
        self.metrics = metrics
        self.context = context_length(base)
        self.eos = frozenset(stop_token_ids(base))
        self._cache_arg = cache_argument(type(base.lm).forward)
        # The decoder's last hidden states during prefill (a hook: no second pass, no copies of
        # every layer's states), for the prompt embeddings drift monitoring uses.
        self._hidden: torch.Tensor | None = None
        self._capturing: int | None = None  # the engine thread's id while prefilling
        self._hook = base.backbone.register_forward_hook(self._capture)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []  # admitted, prompt not fully in a cache yet
        self._partial: Any = None  # the cache of _prefilling[0] while it is chunked
        self._batch: _Batch | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.steps = 0  # decode steps run (tests and benches read these)
        self.prefill_passes = 0
        self.max_rows_seen = 0

    # --- the caller's side (any thread) ----------------------------------------------------------

    def prepare(self, seq: Sequence) -> None:
        """Check and complete `seq` before it is submitted (raises PromptTooLong or
        RequestTooLarge; nothing is queued)."""
        room = self.context - len(seq.prompt)
        if not seq.prompt:
            raise PromptTooLong("the prompt is empty")
        if room <= 0:
            raise PromptTooLong(
                f"the prompt has {len(seq.prompt)} tokens; this model's context is "
                f"{self.context} tokens"
            )
        seq.max_new = min(seq.params.max_tokens, room)
        if seq.reserved > self.kv_budget:
            raise RequestTooLarge(
                f"the prompt ({len(seq.prompt)} tokens) plus max_tokens ({seq.max_new}) exceed "
                f"the generation KV budget of {self.kv_budget} tokens (setting "
                "LORADOCK_GENERATION_KV_BUDGET_TOKENS)"
            )
        p = seq.params
        if p.seed is not None and p.temperature > 0:
            seq.generator = torch.Generator(device=self.base.device).manual_seed(p.seed)
        seq.detok = _Detokenizer(self.base.tokenizer, p.stop)
        seq.stop_ids = (frozenset() if p.ignore_eos else self.eos) | frozenset(p.stop_token_ids)

    def submit(self, seqs: Seq[Sequence]) -> None:
        """Queue prepared sequences (all or none). Raises EngineOverloaded when the queue is
        full, RuntimeError while shutting down."""
        with self._cond:
            if self._closing:
                raise RuntimeError("the generation engine is shutting down")
            if len(self._waiting) + len(seqs) > self.max_waiting:
                raise EngineOverloaded(
                    f"{len(self._waiting)} generations are already waiting, the limit is "
                    f"{self.max_waiting} (setting LORADOCK_MAX_WAITING_GENERATIONS)"
                )
            now = time.perf_counter()
            for s in seqs:
                s.enqueued = now
                self._waiting.append(s)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="loradock-generation", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def waiting(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        batch = self._batch
        return (len(batch.seqs) if batch else 0) + len(self._prefilling)

    def kv_tokens(self) -> int:
        """KV entries the running batch holds now (padded width x rows)."""
        batch = self._batch
        return batch.width * len(batch.seqs) if batch else 0

    def close(self, timeout: float = 30.0) -> None:
        """Stop admitting; let running sequences finish (up to `timeout`), fail the rest."""
        with self._cond:
            self._closing = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for s in waiting:
            self._end(s, Failed("the server is shutting down", "shutdown"))
        if self._thread is not None:
            self._thread.join(timeout)
        for s in self._all_admitted():
            self._end(s, Failed("the server is shutting down", "shutdown"))
        self._batch, self._prefilling, self._partial = None, [], None
        self._hook.remove()

    # --- the engine thread -----------------------------------------------------------------------

    def _all_admitted(self) -> list[Sequence]:
        return list(self._prefilling) + (list(self._batch.seqs) if self._batch else [])

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._prefilling and self._batch is None:
                    if self._closing:
                        return
                    self._cond.wait()
            try:
                with self.gate.serving(), torch.inference_mode():
                    self._iteration()
            except Exception as e:  # a failed step fails its rows, never the engine
                log.exception("generation step failed")
                for s in self._all_admitted():
                    self._end(s, Failed(f"generation failed: {type(e).__name__}: {e}"))
                self._batch, self._prefilling, self._partial = None, [], None
                if self.base.device.type == "cuda":
                    torch.cuda.empty_cache()
            self._report()

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._prefilling:
            links = [trace.Link(q.trace_context) for q in self._prefilling if q.prefilled == 0]
            with tracer.start_as_current_span(
                "loradock.prefill", links=links, attributes={"loradock.rows": len(self._prefilling)}
            ):
                self._prefill_step()
        if self._batch is not None:
            with tracer.start_as_current_span(
                "loradock.decode_step", attributes={"loradock.rows": self.running()}
            ):
                self._decode_step()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.state(self.running(), self.waiting(), self.kv_tokens(), self.kv_budget)

    def _end(self, seq: Sequence, event: Finished | Failed) -> None:
        if seq.done:
            return
        seq.done = True
        if self.metrics is not None:
            self.metrics.ended(event.finish_reason if isinstance(event, Finished) else event.kind)
        try:
            seq.sink(event)
        finally:
            if seq.on_done is not None:
                seq.on_done()

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [s for s in self._waiting if s.cancelled]
            for s in gone:
                self._waiting.remove(s)
        for s in gone:
            self._end(s, Failed("cancelled", "cancelled"))
        if self._prefilling and any(s.cancelled for s in self._prefilling):
            if self._prefilling[0].cancelled:
                self._partial = None
            for s in [s for s in self._prefilling if s.cancelled]:
                self._prefilling.remove(s)
                self._end(s, Failed("cancelled", "cancelled"))
                if self._partial is not None:
                    s.prefilled = 0
        if self._batch is not None and any(s.cancelled for s in self._batch.seqs):
            keep = [i for i, s in enumerate(self._batch.seqs) if not s.cancelled]
            for s in self._batch.seqs:
                if s.cancelled:
                    self._end(s, Failed("cancelled", "cancelled"))
            self._batch = _select(self._batch, keep)

    def _admit(self) -> None:
        """Waiting sequences into the prefill queue, oldest first, while the row and KV budgets
        allow (the padded cache is rows x widest reservation); those that waited longer than
        the queue timeout fail with `overloaded`."""
        admitted: list[Sequence] = []
        expired: list[Sequence] = []
        with self._cond:
            rows = self.running()
            widest = max((s.reserved for s in self._all_admitted()), default=0)
            now = time.perf_counter()
            while self._waiting:
                s = self._waiting[0]
                if self.queue_timeout > 0 and now - s.enqueued > self.queue_timeout:
                    expired.append(self._waiting.popleft())
                    continue
                wide = max(widest, s.reserved)
                if rows + 1 > self.max_running or (rows + 1) * wide > self.kv_budget:
                    break
                self._waiting.popleft()
                admitted.append(s)
                rows, widest = rows + 1, wide
        for s in expired:
            self._end(
                s,
                Failed(
                    f"waited more than {self.queue_timeout:g} s for a place in the generation "
                    "batch (setting LORADOCK_GENERATION_QUEUE_SECONDS); retry later",
                    "overloaded",
                ),
            )
        for s in admitted:
            s.sink(Admitted())
        self._prefilling.extend(admitted)

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        if self._capturing is not None and threading.get_ident() == self._capturing:
            hidden = getattr(output, "last_hidden_state", None)
            self._hidden = hidden if hidden is not None else output[0]

    def _prefill_forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                         cache: Any, ctx: BatchedLoRA,
                         real: torch.Tensor) -> tuple[Any, torch.Tensor]:  # fmt: skip
        """A prefill pass: the model's output, and the sum of the last hidden states over the
        input's real positions (`real` [B, T], 1 = not padding) [B, hidden] float32."""
        self._capturing = threading.get_ident()
        try:
            out = self._forward(ids, mask, positions, cache, ctx)
        finally:
            self._capturing = None
        hidden, self._hidden = self._hidden, None
        assert hidden is not None
        summed = (hidden.float() * real.unsqueeze(-1).to(torch.float32)).sum(1)
        return out, summed

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any, ctx: BatchedLoRA | None) -> Any:  # fmt: skip
        with tracer.start_as_current_span("loradock.forward"), lora.active(ctx):
            return self.lm(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: cache},
            )

    def _prefill_step(self) -> None:
        """One chunk of prefill work: the next chunk of a long prompt, or as many whole short
        prompts as fit in `prefill_chunk` tokens (`idle_prefill_tokens` when no row is decoding),
        in one left-padded pass."""
        budget = self._prefill_budget()
        first = self._prefilling[0]
        if self._partial is not None or len(first.prompt) > budget:
            self._prefill_chunk(first)
            return
        group: list[Sequence] = []
        tokens = 0
        for s in self._prefilling:
            if group and tokens + len(s.prompt) > budget:
                break
            if len(s.prompt) > budget:
                break
            group.append(s)
            tokens += len(s.prompt)
        del self._prefilling[: len(group)]
        width = max(len(s.prompt) for s in group)
        device = self.base.device
        ids = torch.tensor(
            [[0] * (width - len(s.prompt)) + s.prompt for s in group], dtype=torch.long
        )
        mask = torch.tensor(
            [[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in group], dtype=torch.long
        )
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        ids, mask, positions = (t.to(device, non_blocking=True) for t in (ids, mask, positions))
        ctx = BatchedLoRA(self.pool, [s.slot for s in group])
        cache = new_cache(None)
        out, summed = self._prefill_forward(ids, mask, positions, cache, ctx, mask)
        self.prefill_passes += 1
        pooled = (summed / mask.sum(1, keepdim=True).float()).to("cpu", non_blocking=True)
        for i, s in enumerate(group):
            s.embedding = pooled[i]
        batch = _Batch(
            seqs=group,
            kv=cache_tensors(cache_of(out)),
            mask=mask,
            lengths=[len(s.prompt) for s in group],
            pending=torch.zeros(len(group), dtype=torch.long, device=device),
        )
        self._join(batch, out.logits[:, -1])

    def _prefill_budget(self) -> int:
        """Prompt tokens for the next prefill pass: a chunk while rows are decoding (their stall
        is bounded by it), more when none is."""
        return self.prefill_chunk if self._batch is not None else self.idle_prefill_tokens

    def _prefill_chunk(self, seq: Sequence) -> None:
        """The next chunk of one long prompt, on its own partial cache."""
        start = seq.prefilled
        end = min(len(seq.prompt), start + self._prefill_budget())
        device = self.base.device
        ids = torch.tensor([seq.prompt[start:end]], dtype=torch.long).to(device, non_blocking=True)
        mask = torch.ones(1, end, dtype=torch.long, device=device)
        positions = torch.arange(start, end, device=device).view(1, -1)
        if self._partial is None:
            self._partial = new_cache(None)
        ctx = BatchedLoRA(self.pool, [seq.slot])
        real = torch.ones(1, end - start, dtype=torch.long, device=device)  # the chunk's tokens
        out, summed = self._prefill_forward(ids, mask, positions, self._partial, ctx, real)
        self.prefill_passes += 1
        self._partial = cache_of(out)
        seq.embedding = (
            summed[0] if start == 0 or seq.embedding is None else seq.embedding + summed[0]
        )
        seq.prefilled = end
        if end < len(seq.prompt):
            return
        seq.embedding = (seq.embedding / len(seq.prompt)).to("cpu", non_blocking=True)
        self._prefilling.pop(0)
        kv, self._partial = cache_tensors(self._partial), None
        batch = _Batch(
            seqs=[seq],
            kv=kv,
            mask=mask,
            lengths=[len(seq.prompt)],
            pending=torch.zeros(1, dtype=torch.long, device=device),
        )
        self._join(batch, out.logits[:, -1])

    def _join(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Sample the first token of freshly prefilled rows and add them to the running batch."""
        tokens, extra = _sample(logits, batch.seqs)
        batch.pending = tokens
        keep = self._emit(batch.seqs, tokens, extra)
        batch = _select(batch, keep)  # type: ignore[assignment]
        if batch is not None:
            self._batch = _merge(self._batch, batch)
            self._batch.ctx = None
            self.max_rows_seen = max(self.max_rows_seen, len(self._batch.seqs))

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        device = self.base.device
        rows = len(batch.seqs)
        if batch.ctx is None:
            batch.ctx = BatchedLoRA(self.pool, [s.slot for s in batch.seqs], reuse=True)
        mask = torch.cat([batch.mask, torch.ones(rows, 1, dtype=torch.long, device=device)], 1)
        positions = torch.tensor(batch.lengths, dtype=torch.long).view(-1, 1)
        positions = positions.to(device, non_blocking=True)
        out = self._forward(
            batch.pending.view(-1, 1), mask, positions, new_cache(batch.kv), batch.ctx
        )
        self.steps += 1
        batch.kv = cache_tensors(cache_of(out))
        batch.mask = mask
        batch.lengths = [n + 1 for n in batch.lengths]
        tokens, extra = _sample(out.logits[:, -1], batch.seqs)
        batch.pending = tokens
        keep = self._emit(batch.seqs, tokens, extra)
        if len(keep) < rows:
            self._batch = _select(batch, keep)

    def _emit(self, seqs: list[Sequence], tokens: torch.Tensor, extra: list[Any]) -> list[int]:
        """Hand each row its new token; returns the rows that go on. The one host sync."""
        ids = tokens.tolist()
        now = time.perf_counter()
        keep = []
        tok = self.base.tokenizer
        for i, (s, t) in enumerate(zip(seqs, ids, strict=True)):
            if s.cancelled:
                self._end(s, Failed("cancelled", "cancelled"))
                continue
            if self.metrics is not None:
                if s.last_token_at is None:
                    self.metrics.first_token(now - s.enqueued)
                else:
                    self.metrics.inter_token(now - s.last_token_at)
            s.last_token_at = now
            assert s.detok is not None
            if t in s.stop_ids:
                self._finish(s, "stop")
                continue
            s.out.append(t)
            logprob = None
            if extra[i] is not None:
                chosen, top_id, top_lp = extra[i]
                k = int(s.params.logprobs or 0)
                top = tuple(
                    (tok.decode([int(j)]), float(v))
                    for j, v in zip(top_id[:k].tolist(), top_lp[:k].tolist(), strict=True)
                )
                logprob = TokenLogprob(tok.decode([t]), float(chosen), top)
            text = s.detok.push(t)
            s.sink(Token(text, t, logprob))
            if s.detok.stopped:
                self._finish(s, "stop")
            elif len(s.out) >= s.max_new:
                self._finish(s, "length")
            else:
                keep.append(i)
        return keep

    def _finish(self, s: Sequence, reason: str) -> None:
        assert s.detok is not None
        rest = s.detok.finish()
        if rest:
            s.sink(Token(rest, -1))
        if self.metrics is not None:
            self.metrics.finished(len(s.prompt), len(s.out))
        self._end(s, Finished(reason, s.detok.text, len(s.prompt), len(s.out), s.embedding))
