"""Supervised fine-tuning of a generation adapter on the shared frozen causal LM.

The same in-place LoRA as the head-based tasks (adapters/core/lora.py): the base's weights are
never copied and serving keeps running (and keeps priority, `PriorityGate`) while this trains.

The recipe:
1. every row rendered once to token ids and a loss mask: a chat through the base's chat template
   (loss on assistant turns), a prompt/completion pair as prompt + completion + end of sequence
   (loss on the completion and the end token); rows longer than the base's context are dropped
   with a warning naming them (a truncated target would teach the model to stop mid-answer);
2. validation: the given rows, or a seeded split of the data (`validation_split`);
3. the frozen base scored on validation first (`base_val_loss`, `base_val_token_accuracy`):
   the cheaper alternative the adapter must beat;
4. AdamW on the LoRA matrices, warm-up and linear decay, gradient clipping, length-bucketed
   batches (rows of similar length padded together; bucket order shuffled per epoch, seeded),
   gradient accumulation (the loss is normalized by the target tokens of the whole accumulated
   batch, so accumulation equals a bigger batch), bf16 autocast where the hardware has it with
   fp32 master weights;
5. validation loss and mean token accuracy after every epoch (optionally every N steps), early
   stopping on validation loss with patience, the best weights restored;
6. forgetting measured: perplexity of a fixed general reference text (public-domain prose,
   reference.txt) under the base and under the adapter;
7. what is served: the adapter when it beats the base on validation loss, else the base itself
   (a version without LoRA); `serve: "lora"` asks for the adapter regardless.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loradock.adapters.core import lora
from loradock.adapters.core.base import (
    BaseModel,
    cache_argument,
    cache_of,
    cache_tensors,
    new_cache,
)
from loradock.adapters.core.device import cpu_has_native_bf16
from loradock.adapters.core.scheduling import PriorityGate
from loradock.adapters.core.tracing import tracer
from loradock.adapters.tasks.generation import Generation
from loradock.adapters.training.data import Dataset, Example, stratified_split
from loradock.adapters.training.hyperparameters import Hyperparameters
from loradock.adapters.training.trainer import (
    Cancelled,
    Diverged,
    StopReason,
    TrainCallbacks,
    TrainOutcome,
    check_divergence,
    lora_param_groups,
    lora_spec,
    warmup_then_linear_decay,
)

REFERENCE_TEXT = Path(__file__).with_name("reference.txt")
IGNORE = -100
# A batch's rows that share at least this many leading tokens run them once (`shared_prefix`).
MIN_SHARED_PREFIX = 8
# A tokenizer without a chat template gets this one: role-tagged turns, each assistant turn
# ended by the end-of-sequence token (which then stops generation).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\\nassistant: ' }}{% endif %}"
)


def chat_template(base: BaseModel) -> str:
    return str(base.tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE)


def render_chat(
    base: BaseModel, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False
) -> str:
    text = base.tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        chat_template=chat_template(base),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return str(text)


@dataclass
class Rendered:
    """One training row as tokens: ids [T] and the positions whose token is a target."""

    ids: list[int]
    target: list[bool]  # target[t]: token t is predicted and scored

    @property
    def n_targets(self) -> int:
        return sum(self.target)


def render_row(base: BaseModel, row: dict[str, Any]) -> Rendered:
    """A normalized generation row (`Generation.row`) as tokens plus its loss mask."""
    tok = base.tokenizer
    if "messages" in row:
        messages = row["messages"]
        full = render_chat(base, messages)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render_chat(base, messages[:k], add_generation_prompt=True) if k else ""
            through = render_chat(base, messages[: k + 1])
            if full.startswith(through) and through.startswith(before) and k:
                start, end = len(before), len(through)
            else:  # a template that does not render prefixes as prefixes: find the content
                start = full.find(m["content"], cursor)
                end = start + len(m["content"])
            cursor = max(cursor, end)
            if m.get("weight", 1):
                spans.append((start, end))
        if not tok.is_fast:
            raise ValueError("generation training needs a fast (Rust) tokenizer for offsets")
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        target = [any(s <= a < e for s, e in spans) and b > a for a, b in enc["offset_mapping"]]
        return Rendered(ids, target)
    prompt_ids = list(tok(row["prompt"], add_special_tokens=True)["input_ids"])
    completion_ids = list(tok(row["completion"], add_special_tokens=False)["input_ids"])
    eos = tok.eos_token_id
    tail = completion_ids + ([int(eos)] if eos is not None else [])
    return Rendered(prompt_ids + tail, [False] * len(prompt_ids) + [True] * len(tail))


def shared_prefix(rows: Sequence[Rendered]) -> int:
    """How many leading tokens every row of `rows` has in common and may run once: the common
    prefix, cut so that no target lies in it and the hidden state of its last token scores
    nothing (the first target of any row is at least one token past it). 0 for a single row."""
    if len(rows) < 2:
        return 0
    first = rows[0].ids
    n = min(min(len(r.ids) for r in rows), min(r.target.index(True) for r in rows) - 1)
    for r in rows[1:]:
        k = 0
        while k < n and r.ids[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def prefix_groups(rows: Sequence[Rendered], batch_size: int) -> list[list[int]]:
    """Row indices grouped so that rows sharing a long prompt prefix (`shared_prefix`) batch
    together: rows sorted by their tokens, then the sorted run split where neighbours share
    least, as long as the parts hold a full batch each; parts too small for a batch stay
    together (they still share what their parent group shares). Rows that share fewer than
    `MIN_SHARED_PREFIX` tokens with anyone form one group, batched by length alone."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].ids)
    link = [
        shared_prefix([rows[a], rows[b]]) for a, b in itertools.pairwise(order)
    ]  # link[k]: what sorted rows k and k+1 share
    link = [v if v >= MIN_SHARED_PREFIX else 0 for v in link]
    groups: list[list[int]] = []
    todo = [(0, len(order))]
    while todo:
        lo, hi = todo.pop()
        inner = link[lo : hi - 1]
        if hi - lo < 2 * batch_size or not inner or min(inner) == max(inner):
            groups.append(order[lo:hi])
            continue
        weakest = min(inner)
        cuts = [lo] + [lo + k + 1 for k, v in enumerate(inner) if v == weakest] + [hi]
        rest: list[int] = []
        for a, b in itertools.pairwise(cuts):
            if b - a >= batch_size:
                todo.append((a, b))
            else:
                rest.extend(order[a:b])
        if rest:
            groups.append(rest)
    return groups


def autocast_dtype(device: torch.device, setting: str) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it natively ('auto'), or as asked."""
    if setting == "no":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if setting == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


class SFTTrainer:
    """Trains generation adapters on one causal-LM BaseModel (one Trainer per run)."""

    def __init__(self, base: BaseModel, gate: PriorityGate | None = None) -> None:
        if base.lm is None:
            raise ValueError("generation needs a causal-LM base")
        self.base = base
        self.gate = gate or PriorityGate()
        self.device = base.device
        self.lm_head: torch.nn.Module = base.lm.get_output_embeddings()

    # --- public --------------------------------------------------------------------------------

    def run(
        self,
        train: Dataset,
        hp: Hyperparameters,
        *,
        validation: Sequence[Example] | None = None,
        validation_split: float = 0.2,
        callbacks: TrainCallbacks | None = None,
    ) -> TrainOutcome:
        cb = callbacks or TrainCallbacks()
        started = time.perf_counter()
        task = Generation.from_dataset(train)
        out = TrainOutcome(status="running", stop_reason=None, task=task)
        report: dict[str, Any] = {"warnings": list(train.warnings), "rows": len(train.examples)}
        out.report = report
        try:
            rendered, dropped = self._render(train.examples, "training_data", report)
            examples = [e for e in train.examples if e.text in rendered]
            if validation is not None:
                va_rendered, _ = self._render(validation, "validation_data", report)
                tr, va = examples, [e for e in validation if e.text in va_rendered]
                rendered.update(va_rendered)
                report["validation"] = "given"
            else:
                tr, va = stratified_split(examples, Generation, validation_split, hp.seed)
                report["validation"] = f"random split, {validation_split:.0%} held out"
            if not tr or not va:
                raise ValueError(
                    f"{len(tr)} training and {len(va)} validation rows remain after dropping "
                    f"{dropped} rows longer than {self.base.max_length} tokens; at least one of "
                    "each is needed"
                )
            report["tokens"] = {
                "train_targets": sum(rendered[e.text].n_targets for e in tr),
                "validation_targets": sum(rendered[e.text].n_targets for e in va),
                "longest_row": max(len(rendered[e.text].ids) for e in tr + va),
            }
            tr_rows = [rendered[e.text] for e in tr]
            va_rows = [rendered[e.text] for e in va]
            amp = autocast_dtype(self.device, hp.mixed_precision)
            report["precision"] = "bf16 autocast, fp32 weights" if amp else "float32"

            base_m = self._evaluate(None, va_rows, amp)
            out.baseline = {
                "kind": "base",
                "val_loss": round(base_m["loss"], 5),
                "val_token_accuracy": round(base_m["token_accuracy"], 5),
            }
            cb.on_event({"type": "baseline", "baseline": out.baseline})
            base_ppl = reference_perplexity(self.base, None, self.gate)
            out.baseline["reference_perplexity"] = round(base_ppl, 4)

            res = self._train(tr_rows, va_rows, hp, out, cb, amp)
            out.weights, out.history, out.metrics = res["lora"], res["history"], res["metrics"]
            out.stop_reason = res["stop_reason"]
            out.metrics["base_val_loss"] = out.baseline["val_loss"]
            out.metrics["base_val_token_accuracy"] = out.baseline["val_token_accuracy"]
            out.metrics["base_reference_perplexity"] = round(base_ppl, 4)
            ppl = reference_perplexity(self.base, out.weights, self.gate)
            out.metrics["reference_perplexity"] = round(ppl, 4)
            out.metrics["reference_perplexity_ratio"] = round(ppl / base_ppl, 4)
            self._pick_winner(out, hp)
            out.reference_texts = [e.text for e in va]
            report["timings"] = {"total_seconds": round(time.perf_counter() - started, 3)}
            out.status = "succeeded"
        except Cancelled:
            out.status, out.stop_reason = "cancelled", "cancelled"
            out.weights = None
        except Diverged as e:
            out.status, out.stop_reason, out.error = "failed", "diverged", str(e)
            out.weights = None
        except ValueError as e:
            out.status, out.error = "failed", str(e)
            out.weights = None
        return out

    # --- preparation ---------------------------------------------------------------------------

    def _render(
        self, examples: Sequence[Example], dataset: str, report: dict[str, Any]
    ) -> tuple[dict[str, Rendered], int]:
        """{example text: its tokens} for the rows that fit the context; over-long rows are
        dropped with a warning naming them (by position in the deduplicated data)."""
        out: dict[str, Rendered] = {}
        too_long: list[int] = []
        no_target: list[int] = []
        for i, e in enumerate(examples, start=1):
            r = render_row(self.base, Generation.row(e))
            if len(r.ids) > self.base.max_length:
                too_long.append(i)
            elif r.n_targets == 0:
                no_target.append(i)
            else:
                out[e.text] = r
        for rows, why in (
            (too_long, f"longer than the context of {self.base.max_length} tokens (setting "
             "LORADOCK_MAX_SEQ_LENGTH); a truncated answer would teach stopping mid-answer"),
            (no_target, "no target token left after rendering"),
        ):  # fmt: skip
            if rows:
                shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
                report["warnings"].append(f"{dataset}: dropped {len(rows)} rows {why}: {shown}")
        return out, len(too_long) + len(no_target)

    # --- training ------------------------------------------------------------------------------

    def _train(
        self,
        tr: list[Rendered],
        va: list[Rendered],
        hp: Hyperparameters,
        out: TrainOutcome,
        cb: TrainCallbacks,
        amp: torch.dtype | None,
    ) -> dict[str, Any]:
        spec, names = lora_spec(self.base, hp)
        lora.install(self.base.backbone, names)
        shapes = {
            t.name: (t.in_features, t.out_features)
            for t in self.base.linear_targets()
            if t.name in set(names)
        }
        gen = torch.Generator().manual_seed(hp.seed)
        weights = lora.LoRAWeights(spec, shapes, device=self.device, generator=gen)
        weights.seed_dropout(hp.seed)
        params = list(weights.parameters())
        opt = torch.optim.AdamW(
            lora_param_groups(weights, hp, hp.b_learning_rate_ratio_for(self.base.kind)),
            weight_decay=hp.weight_decay,
        )
        accumulate = hp.gradient_accumulation_steps
        batches_per_epoch = math.ceil(len(tr) / hp.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / accumulate)
        total_steps = max(1, steps_per_epoch * hp.epochs)
        sched = warmup_then_linear_decay(opt, total_steps, hp.warmup_ratio)
        rng = random.Random(hp.seed)
        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {"loss": out.baseline["val_loss"], "epoch": 0, "metrics": None}
        best["state"] = {k: v.detach().clone() for k, v in weights.state_dict().items()}
        bad_evals, step, epoch = 0, 0, 0
        stop_reason: StopReason = "max_epochs"
        first: float | None = None
        recent: list[float] = []
        stop = False

        def validate(train_loss: float, partial: bool, seconds: float | None = None) -> bool:
            nonlocal bad_evals
            m = self._evaluate(weights, va, amp)
            record: dict[str, Any] = {
                "epoch": epoch, "step": step, "train_loss": round(train_loss, 5),
                "val_loss": round(m["loss"], 5),
                "val_token_accuracy": round(m["token_accuracy"], 5),
            }  # fmt: skip
            if partial:
                record["partial"] = True
            if seconds is not None:
                record["seconds"] = round(seconds, 3)
            improved = m["loss"] < best["loss"] - hp.min_delta
            if improved:
                best.update(loss=m["loss"], epoch=epoch, metrics=m, train_loss=train_loss)
                best["state"] = {k: v.detach().clone() for k, v in weights.state_dict().items()}
                bad_evals = 0
            else:
                bad_evals += 1
            if not partial:
                best.update(last=(epoch, m, train_loss))
            record["best"] = improved
            history.append(record)
            cb.on_event({"type": "evaluation" if partial else "epoch", **record})
            return hp.early_stopping and bad_evals >= hp.patience

        for epoch in range(1, hp.epochs + 1):
            weights.train()
            t_epoch = time.perf_counter()
            losses: list[float] = []
            batches = self._batches(tr, hp.batch_size, rng)
            for g in range(0, len(batches), accumulate):
                group = batches[g : g + accumulate]
                with tracer.start_as_current_span(
                    "loradock.train_step",
                    attributes={"loradock.epoch": epoch, "loradock.step": step + 1},
                ):
                    n_targets = sum(tr[i].n_targets for b in group for i in b)
                    total = 0.0
                    for b in group:
                        if cb.should_cancel():
                            raise Cancelled()
                        self.gate.yield_to_serving()
                        loss_sum, _, _ = self._forward([tr[i] for i in b], weights, amp)
                        (loss_sum / n_targets).backward()
                        total += float(loss_sum.detach())
                    torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                step += 1
                value = total / n_targets
                check_divergence(value, first, recent)
                first = value if first is None else first
                losses.append(value)
                cb.on_event(
                    {"type": "progress", "epoch": epoch, "epochs": hp.epochs, "step": step,
                     "steps": total_steps, "loss": round(value, 5)}
                )  # fmt: skip
                if hp.eval_every_steps and step % hp.eval_every_steps == 0:
                    stop = validate(statistics.fmean(losses), partial=True)
                    weights.train()
                    if stop:
                        stop_reason = "early_stopping"
                        break
            if stop:
                break
            train_loss = statistics.fmean(losses) if losses else float("nan")
            if validate(train_loss, partial=False, seconds=time.perf_counter() - t_epoch):
                stop_reason = "early_stopping"
                break

        if hp.early_stopping:
            weights.load_state_dict(best["state"])
            kept_epoch, kept, kept_train = best["epoch"], best["metrics"], best.get("train_loss")
        else:
            kept_epoch, kept, kept_train = best["last"]
        weights.eval()
        weights.requires_grad_(False)
        metrics: dict[str, Any] = {
            "best_epoch": kept_epoch,
            "stop_reason": stop_reason,
            "epochs_run": epoch,
            "steps": step,
            "trainable_parameters": sum(p.numel() for p in params),
        }
        if kept is not None:
            metrics["val_loss"] = round(kept["loss"], 5)
            metrics["val_token_accuracy"] = round(kept["token_accuracy"], 5)
            if kept_train is not None:
                metrics["train_loss"] = round(kept_train, 5)
                metrics["generalization_gap"] = round(kept["loss"] - kept_train, 5)
        return {"lora": weights, "history": history, "metrics": metrics,
                "stop_reason": stop_reason}  # fmt: skip

    @staticmethod
    def _batches(rows: list[Rendered], batch_size: int, rng: random.Random) -> list[list[int]]:
        """Batches of `batch_size` rows (the last may be short): rows sharing a prompt prefix
        batch together (`prefix_groups`), by length within each group (ties shuffled); the
        rows left over from each group's whole batches (a random few each epoch) are batched
        together by length; the batch order is shuffled. Each batch pads to a similar length
        and runs its shared prefix once; every epoch differs, seeded."""
        batches: list[list[int]] = []
        rest: list[int] = []
        for group in prefix_groups(rows, batch_size):
            spare = set(rng.sample(group, len(group) % batch_size))
            rest.extend(spare)
            kept = sorted(
                (i for i in group if i not in spare), key=lambda i: (len(rows[i].ids), rng.random())
            )
            batches.extend(kept[s : s + batch_size] for s in range(0, len(kept), batch_size))
        rest.sort(key=lambda i: (len(rows[i].ids), rng.random()))
        batches.extend(rest[s : s + batch_size] for s in range(0, len(rest), batch_size))
        rng.shuffle(batches)
        return batches

    def _forward(
        self,
        rows: Sequence[Rendered],
        weights: lora.LoRAWeights | None,
        amp: torch.dtype | None,
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(summed cross-entropy over target tokens, their count, correct next-token guesses).

        Rows that start with the same tokens (a shared system prompt, the chat template's
        header) run that prefix once: one pass over the prefix at batch 1, its keys and values
        broadcast to every row, then one pass over the rows' own tokens. Gradients flow
        through the broadcast, so loss and gradients equal the padded full pass's."""
        shared = shared_prefix(rows)
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        host = self.base.pad([r.ids[shared:] for r in rows])
        targets = torch.full(host["input_ids"].shape, IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            t = torch.tensor(r.ids[shared:], dtype=torch.long)
            targets[i, : len(t)] = torch.where(torch.tensor(r.target[shared:]), t, IGNORE)
        extra: dict[str, torch.Tensor] = {}
        if shared:
            extra["prefix"] = torch.tensor([rows[0].ids[:shared]], dtype=torch.long)
        batch = self.base.to_device({**host, **extra, "targets": targets})
        # Token t is predicted from positions < t: the hidden state at t-1 is scored against it.
        # (The shared prefix ends before the first target's predecessor, so no target needs a
        # prefix position's hidden state.)
        wanted = batch["targets"][:, 1:]
        keep = wanted != IGNORE
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            with lora.active(weights):
                if shared:
                    hidden = self._after_prefix(
                        batch["prefix"], batch["input_ids"], batch["attention_mask"]
                    )
                else:
                    hidden = self.base.hidden_states(batch["input_ids"], batch["attention_mask"])
            logits = self.lm_head(hidden[:, :-1][keep])  # only the scored positions: [N, vocab]
        logits = logits.float()
        y = wanted[keep]
        loss = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.detach().argmax(-1) == y).sum()
        return loss, int(y.numel()), correct

    def _after_prefix(
        self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states of `ids` [B, S] (right-padded) continuing the one `prefix` [1, P]."""
        rows, s = ids.shape
        p = prefix.shape[1]
        out = self.base.backbone(
            input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True
        )
        kv = [
            (k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
            for k, v in cache_tensors(cache_of(out))
        ]
        positions = torch.arange(p, p + s, device=ids.device).expand(rows, s)
        full_mask = torch.cat([mask.new_ones(rows, p), mask], dim=1)
        out = self.base.backbone(
            input_ids=ids,
            attention_mask=full_mask,
            position_ids=positions,
            use_cache=True,
            **{cache_argument(type(self.base.backbone).forward): new_cache(kv)},
        )
        return out.last_hidden_state

    @torch.inference_mode()
    def _evaluate(
        self, weights: lora.LoRAWeights | None, rows: list[Rendered], amp: torch.dtype | None
    ) -> dict[str, float]:
        """Mean cross-entropy per target token and mean token accuracy (None weights: base)."""
        was = weights.training if weights is not None else False
        if weights is not None:
            weights.eval()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
        loss, n, correct = 0.0, 0, 0
        for s in range(0, len(order), 16):
            self.gate.yield_to_serving()
            part_loss, part_n, part_correct = self._forward(
                [rows[i] for i in order[s : s + 16]], weights, amp
            )
            loss += float(part_loss)
            n += part_n
            correct += int(part_correct)
        if weights is not None:
            weights.train(was)
        return {"loss": loss / max(n, 1), "token_accuracy": correct / max(n, 1)}

    # --- finishing -----------------------------------------------------------------------------

    @staticmethod
    def _pick_winner(out: TrainOutcome, hp: Hyperparameters) -> None:
        """The adapter when it beats the frozen base on validation loss, else the base."""
        lora_loss, base_loss = out.metrics.get("val_loss"), out.baseline.get("val_loss")
        scores = f"val_loss: adapter {lora_loss}, base {base_loss}"
        if hp.serve == "lora":
            win, why = True, f"serve='lora' asked for the adapter ({scores})"
        elif hp.serve == "base":
            win, why = False, f"serve='base' asked for the base model ({scores})"
        elif lora_loss is None or out.metrics.get("best_epoch", 0) <= 0:
            win, why = False, f"no epoch improved on the base ({scores})"
        else:
            win = Generation.better(out.metrics, out.baseline)
            why = scores
        out.winner = "lora" if win else "base"
        out.winner_reason = (
            "serving the adapter: " if win else "serving the base model without an adapter: "
        ) + why
        if not win:
            out.weights = None
        if out.metrics.get("generalization_gap") is not None:
            out.report["generalization_gap"] = out.metrics["generalization_gap"]


_REFERENCE_CACHE: dict[tuple[str, int], float] = {}


@torch.inference_mode()
def reference_perplexity(
    base: BaseModel, weights: lora.LoRAWeights | None, gate: PriorityGate | None = None
) -> float:
    """Perplexity of the shipped reference text (public-domain prose) under the base, or under
    the base with `weights`: an adapter that raises it has lost some general language ability.
    Scored in windows of at most the base's context, each predicted from its own start."""
    key = (base.fingerprint, base.max_length)
    if weights is None and key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    assert base.lm is not None
    ids = base.tokenizer(REFERENCE_TEXT.read_text(), add_special_tokens=False)["input_ids"]
    window = min(base.max_length, 512)
    head = base.lm.get_output_embeddings()
    loss, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        if gate is not None:
            gate.yield_to_serving()
        chunk = torch.tensor([ids[s : s + window]], device=base.device)
        if chunk.shape[1] < 2:
            break
        with lora.active(weights):
            hidden = base.hidden_states(chunk, torch.ones_like(chunk))
        logits = head(hidden[0, :-1]).float()
        loss += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        n += chunk.shape[1] - 1
    value = math.exp(loss / max(n, 1))
    if weights is None:
        _REFERENCE_CACHE[key] = value
    return value
