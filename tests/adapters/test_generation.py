"""The generation task on a tiny random Llama: rows, rendering, SFT, artifacts, generation."""

from __future__ import annotations

import json

import pytest
import torch

from loradock.adapters import tasks
from loradock.adapters.artifacts.files import (
    HEAD,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    build_files,
    load_adapter,
)
from loradock.adapters.artifacts.store import LocalStore
from loradock.adapters.core.base import BaseModel
from loradock.adapters.serving.generation import (
    SamplingParams,
    chat_prompt_ids,
    completion_prompt_ids,
    generate,
)
from loradock.adapters.tasks.generation import Generation
from loradock.adapters.training.data import DatasetError, validate_rows
from loradock.adapters.training.hyperparameters import Hyperparameters
from loradock.adapters.training.sft import SFTTrainer, render_row

LIMITS = {"max_rows": 10_000, "max_text_chars": 10_000}


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return BaseModel.load(tiny_llama_dir, device="cpu", max_length=48)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}  # fmt: skip


# What the random model cannot know: every question, whatever its words, is answered the same way.
ANSWER = "thanks billing"
QUESTIONS = ["refund", "login", "crash", "late", "password", "card", "package", "slow"]


def sft_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        filler = ["please", "help", "why", "how", "what"][i % 5]
        verb = ["is", "was", "are"][i % 3]
        rows.append(chat(f"{filler} {QUESTIONS[i % len(QUESTIONS)]} {verb}", ANSWER))
    return rows


def test_generation_is_registered_for_causal_lm_bases(llama, tiny_bert_dir):
    assert llama.kind == "causal_lm"
    assert tasks.for_base("causal_lm") == ["generation"]
    assert "generation" not in tasks.for_base("encoder")
    assert BaseModel.load(tiny_bert_dir, device="cpu").kind == "encoder"


def test_chat_and_completion_rows_are_parsed_and_deduplicated():
    rows = [chat("hi", "hello"), chat("hi", "hello"), {"prompt": "a", "completion": " b"},
            chat("hi", "hello there")]  # fmt: skip
    ds = validate_rows(rows, Generation, **LIMITS)
    assert len(ds.examples) == 3  # the exact duplicate dropped; other answers are other rows
    assert any("duplicate" in w for w in ds.warnings)
    assert any("mixes chat" in w for w in ds.warnings)
    assert {e.label for e in ds.examples} == {"chat", "completion"}
    assert Generation.row(ds.examples[0])["messages"][1]["content"] == "hello"


@pytest.mark.parametrize(
    ("row", "field", "words"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "unknown role"),
        ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
         "messages[0].content", "empty"),
        ({"messages": "hello"}, "messages", "non-empty list"),
        ({"prompt": "p"}, "completion", "missing"),
        ({"prompt": "p", "completion": ""}, "completion", "empty"),
        ({"text": "t", "label": "x"}, "messages", "generation row"),
    ],
)  # fmt: skip
def test_bad_rows_are_named_by_row_and_field(row, field, words):
    rows = [chat("a", "b"), chat("c", "d"), chat("e", "f"), row]
    with pytest.raises(DatasetError) as e:
        validate_rows(rows, Generation, **LIMITS)
    problem = e.value.problems[0]
    assert (problem.row, problem.field) == (4, field)
    assert words in problem.message


def test_assistant_turns_only_are_targets(llama):
    row = {"messages": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "refund please"},
                        {"role": "assistant", "content": "billing"},
                        {"role": "user", "content": "and login"},
                        {"role": "assistant", "content": "account", "weight": 0},
                        {"role": "user", "content": "crash"},
                        {"role": "assistant", "content": "bug"}]}  # fmt: skip
    r = render_row(llama, row)
    targets = [i for i, t in zip(r.ids, r.target, strict=True) if t]
    text = llama.tokenizer.decode(targets)
    assert "billing" in text
    assert "bug" in text
    assert "account" not in text  # weight 0: context, not a target
    assert "refund" not in text
    assert llama.tokenizer.eos_token_id in targets  # the end of each turn is learned


def test_completion_rows_target_the_completion_and_the_end(llama):
    r = render_row(llama, {"prompt": "refund please", "completion": "billing"})
    targets = [i for i, t in zip(r.ids, r.target, strict=True) if t]
    assert llama.tokenizer.decode(targets[:-1]).strip() == "billing"
    assert targets[-1] == llama.tokenizer.eos_token_id


@pytest.fixture(scope="module")
def trained(llama):
    ds = validate_rows(sft_rows(), Generation, **LIMITS)
    hp = Hyperparameters(learning_rate=2e-2, epochs=8, batch_size=4, rank=8, seed=0,
                         gradient_accumulation_steps=2, patience=2)  # fmt: skip
    return SFTTrainer(llama).run(ds, hp, validation_split=0.25)


def test_sft_beats_the_frozen_base_and_measures_forgetting(trained):
    out = trained
    assert out.status == "succeeded", out.error
    m = out.metrics
    # A random tiny model's logits are nearly flat (its loss cannot fall far), but the answer's
    # tokens become the most likely ones: it learned the answer.
    assert m["val_loss"] < out.baseline["val_loss"] - 0.1
    assert m["val_token_accuracy"] >= 0.9 > out.baseline["val_token_accuracy"]
    assert m["base_val_loss"] == out.baseline["val_loss"]
    assert out.winner == "lora"
    assert out.weights is not None
    assert m["reference_perplexity"] > 0
    assert m["base_reference_perplexity"] > 0
    epochs = [h for h in out.history if not h.get("partial")]
    assert [h["epoch"] for h in epochs] == list(range(1, len(epochs) + 1))
    assert {"train_loss", "val_loss", "val_token_accuracy"} <= set(epochs[0])
    best = min(epochs, key=lambda h: h["val_loss"])
    assert m["best_epoch"] == best["epoch"]  # the best epoch is what was kept
    assert m["val_loss"] == best["val_loss"]


def test_sft_is_seeded(llama):
    ds = validate_rows(sft_rows(), Generation, **LIMITS)
    hp = Hyperparameters(learning_rate=1e-2, epochs=2, batch_size=8, seed=0,
                         gradient_accumulation_steps=2, early_stopping=False)  # fmt: skip
    a = SFTTrainer(llama).run(ds, hp, validation_split=0.25)
    b = SFTTrainer(llama).run(ds, hp, validation_split=0.25)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]


def test_a_useless_adapter_serves_the_base(llama):
    ds = validate_rows(sft_rows(20), Generation, **LIMITS)
    # A learning rate this small cannot move the loss: the base validates as well.
    hp = Hyperparameters(learning_rate=1e-9, epochs=1, batch_size=8, seed=0)
    out = SFTTrainer(llama).run(ds, hp, validation_split=0.25)
    assert out.status == "succeeded"
    assert out.winner == "base"
    assert out.weights is None
    assert "base model" in out.winner_reason


def test_over_long_rows_are_dropped_with_a_warning(llama):
    long = chat(" ".join(["please"] * 80), ANSWER)
    ds = validate_rows([*sft_rows(12), long], Generation, **LIMITS)
    hp = Hyperparameters(learning_rate=1e-3, epochs=1, batch_size=8, seed=0)
    out = SFTTrainer(llama).run(ds, hp, validation_split=0.25)
    assert out.status == "succeeded"
    assert any("longer than the context" in w and "13" in w for w in out.report["warnings"])


def test_artifact_is_peft_causal_lm_and_peft_reproduces_greedy_output(
    llama, trained, tiny_llama_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files = build_files(base=llama, task=trained.task, meta={}, head=None,
                        weights=trained.weights, profile_texts=[])  # fmt: skip
    assert HEAD not in files
    config = json.loads(files[PEFT_CONFIG])
    assert config["task_type"] == "CAUSAL_LM"
    assert not config["base_model_name_or_path"].startswith("/")
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        (folder / name).write_bytes(files[name])

    store = LocalStore(tmp_path / "store")
    store.publish("t/a/v1", files, {})
    model = load_adapter(store, "t/a/v1", llama)
    assert model.head is None
    assert model.weights is not None

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(plain, folder).eval()
    prompt = chat_prompt_ids(llama, [{"role": "user", "content": "why refund is"}])
    ours = generate(llama, model.weights, prompt, SamplingParams(max_tokens=8, temperature=0))
    ids = torch.tensor([prompt])
    theirs = peft_model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
        eos_token_id=llama.tokenizer.eos_token_id, pad_token_id=llama.tokenizer.eos_token_id,
    )[0, len(prompt):].tolist()  # fmt: skip
    eos = llama.tokenizer.eos_token_id
    assert ours.token_ids == [t for t in theirs if t != eos][: len(ours.token_ids)]
    assert ours.text.strip() == ANSWER  # the adapter learned the answer
    base_answer = generate(llama, None, prompt, SamplingParams(max_tokens=8, temperature=0))
    assert base_answer.token_ids != ours.token_ids


def test_sampling_is_seeded_and_stop_strings_cut(llama):
    prompt = completion_prompt_ids(llama, "the refund")
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    a, b = generate(llama, None, prompt, p), generate(llama, None, prompt, p)
    assert a.token_ids == b.token_ids
    c = generate(llama, None, prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=8))
    assert c.token_ids != a.token_ids
    greedy = generate(llama, None, prompt, SamplingParams(max_tokens=12, temperature=0))
    assert greedy.finish_reason in ("length", "stop")
    words = greedy.text.split()
    if len(words) >= 2:
        cut = generate(llama, None, prompt,
                       SamplingParams(max_tokens=12, temperature=0, stop=(words[1],)))  # fmt: skip
        assert cut.finish_reason == "stop"
        assert words[1] not in cut.text


def test_generation_exports_a_causal_lm_peft_folder_with_a_card(llama, trained):
    from loradock.adapters.artifacts.export import ExportError, export_files
    from loradock.adapters.artifacts.files import AdapterModel

    meta = {"version": 1, "metrics": trained.metrics, "data": {"rows": 40}}
    model = AdapterModel(meta=meta, task=trained.task, head=None, weights=trained.weights)
    files = export_files(model, llama, "peft", base_model_id="org/tiny-llama", name="helpdesk")
    config = json.loads(files["adapter_config.json"])
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    assert all(t.startswith("model.layers.") for t in config["target_modules"])
    card = files["README.md"].decode()
    assert "pipeline_tag: text-generation" in card
    assert f"| val_loss | {trained.metrics['val_loss']} |" in card
    with pytest.raises(ExportError, match="peft only"):
        export_files(model, llama, "sentence-transformers", base_model_id="x", name="h")
    base_only = AdapterModel(meta=meta, task=trained.task, head=None, weights=None)
    with pytest.raises(ExportError, match="base model"):
        export_files(base_only, llama, "peft", base_model_id="x", name="h")


SYSTEM = "you are the support desk answer with the team that handles the question please"


def test_a_shared_prompt_prefix_runs_once_with_the_same_loss_and_gradients(llama, monkeypatch):
    from loradock.adapters.core import lora
    from loradock.adapters.training import sft
    from loradock.adapters.training.trainer import lora_spec

    rows = [
        render_row(llama, {"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{QUESTIONS[i]} " * (1 + i % 3)},
            {"role": "assistant", "content": ANSWER if i % 2 else "thanks login team"},
        ]})
        for i in range(6)
    ]  # fmt: skip
    shared = sft.shared_prefix(rows)
    first_target = min(r.target.index(True) for r in rows)
    assert sft.MIN_SHARED_PREFIX <= shared < first_target  # the system prompt, not the answer
    hp = Hyperparameters(rank=4, seed=0)
    spec, names = lora_spec(llama, hp)
    lora.install(llama.backbone, names)
    shapes = {t.name: (t.in_features, t.out_features) for t in llama.linear_targets()
              if t.name in set(names)}  # fmt: skip
    weights = lora.LoRAWeights(spec, shapes, device=llama.device,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        for p in weights.parameters():
            p.normal_(0, 0.2)  # B is zero at init: make both matrices matter
    weights.eval()  # no dropout: both passes see the same function
    trainer = SFTTrainer(llama)
    seen: list[tuple[int, ...]] = []
    hook = llama.backbone.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )

    def loss_and_grads():
        weights.zero_grad(set_to_none=True)
        loss, n, correct = trainer._forward(rows, weights, None)
        loss.backward()
        return float(loss), n, int(correct), [p.grad.clone() for p in weights.parameters()]

    try:
        once = loss_and_grads()
        assert seen == [(1, shared), (len(rows), max(len(r.ids) for r in rows) - shared)]
        seen.clear()
        monkeypatch.setattr(sft, "MIN_SHARED_PREFIX", 10**9)
        full = loss_and_grads()
        assert seen == [(len(rows), max(len(r.ids) for r in rows))]
    finally:
        hook.remove()
    assert once[1:3] == full[1:3]  # the same targets, the same guesses
    assert once[0] == pytest.approx(full[0], rel=1e-5)
    for a, b in zip(once[3], full[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_batches_keep_rows_of_one_prompt_together_and_by_length():
    from loradock.adapters.training import sft

    def row(prompt: list[int], answer_len: int) -> sft.Rendered:
        ids = prompt + [90 + k for k in range(answer_len)]
        return sft.Rendered(ids, [False] * len(prompt) + [True] * answer_len)

    a = [row([1] * 12 + [2, 3 + i], 1 + i % 4) for i in range(8)]  # one long system prompt
    b = [row([1] * 3 + [5] * 12 + [i], 1 + i % 3) for i in range(8)]  # another, same opening
    loose = [row([40 + i, 7], 1 + i) for i in range(5)]  # nothing shared
    rows = a + b + loose
    groups = sft.prefix_groups(rows, batch_size=4)
    assert sorted(map(sorted, groups)) == [list(range(8)), list(range(8, 16)), list(range(16, 21))]
    batches = SFTTrainer._batches(rows, 4, __import__("random").Random(0))
    assert sorted(i for b_ in batches for i in b_) == list(range(21))
    for batch in batches:
        if all(i < 16 for i in batch):  # the prompt groups fill whole batches
            assert len({i < 8 for i in batch}) == 1
            assert sft.shared_prefix([rows[i] for i in batch]) >= 13
    pool = next(b_ for b_ in batches if 20 in b_)
    assert pool == sorted(pool, key=lambda i: len(rows[i].ids))  # by length, as before
