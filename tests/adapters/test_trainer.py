import math
import threading

import pytest
import torch

from loradock.adapters import tasks
from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel
from loradock.adapters.core.scheduling import PriorityGate
from loradock.adapters.training.data import validate_rows
from loradock.adapters.training.hyperparameters import B_RATIO_DEFAULT
from loradock.adapters.training.trainer import (
    Hyperparameters,
    TrainCallbacks,
    Trainer,
    lora_param_groups,
)
from tests.datasets import keyword_rows, regression_rows

# Tiny random models learn slowly: a high learning rate keeps these tests short.
FAST = {"learning_rate": 0.05, "init_head_l2": 1e-3, "batch_size": 8}


@pytest.fixture
def base(tiny_bert_dir):
    return BaseModel.load(tiny_bert_dir, device="cpu")


def dataset(rows, task="classification"):
    return validate_rows(rows, tasks.get(task), max_rows=10_000, max_text_chars=1000)


def test_runs_reports_and_restores_the_best_epoch(base):
    out = Trainer(base).run(dataset(keyword_rows(30)), Hyperparameters(epochs=8, **FAST))
    assert out.status == "succeeded"
    assert out.stop_reason in ("early_stopping", "max_epochs")
    assert out.history
    assert [h["epoch"] for h in out.history] == list(range(1, len(out.history) + 1))
    for h in out.history:
        assert set(h) >= {"train_loss", "val_loss", "val_accuracy", "val_macro_f1", "per_class"}
        assert set(h["per_class"]) == {"billing", "login", "shipping"}
    m = out.metrics
    best_loss = min([h["val_loss"] for h in out.history] + [math.inf])
    improved = [h["epoch"] for h in out.history if h["best"]]
    if m["best_epoch"] > 0:  # the restored epoch is the last that improved, and the lowest loss
        assert improved[-1] == m["best_epoch"]
        assert m["val_loss"] == pytest.approx(best_loss, abs=1e-4)
        at_best = out.history[m["best_epoch"] - 1]
        assert m["generalization_gap"] == pytest.approx(
            at_best["val_loss"] - at_best["train_loss"], abs=1e-4
        )
    else:  # no epoch beat the starting point (the probe's head): the start is kept
        assert improved == []
        assert m["val_loss"] <= best_loss + 1e-6
    assert out.baseline["kind"] == "linear_probe"
    assert 0 <= out.baseline["val_macro_f1"] <= 1
    assert out.winner in ("lora", "probe")
    assert out.winner_reason
    assert out.report["validation"].startswith("stratified split")


def test_the_winner_is_never_worse_than_the_probe_on_validation(base):
    out = Trainer(base).run(dataset(keyword_rows(30)), Hyperparameters(epochs=6, **FAST))
    lora, probe = out.metrics["val_macro_f1"], out.baseline["val_macro_f1"]
    lora_wins = out.metrics["best_epoch"] > 0 and lora > probe  # the decision rule itself
    assert out.winner == ("lora" if lora_wins else "probe")
    assert (out.weights is not None) is lora_wins  # the probe alone is a head-only adapter
    served = out.served_metrics()
    assert served["model"] == out.winner
    assert served["val_macro_f1"] == (lora if lora_wins else probe)
    assert served["val_macro_f1"] >= probe


def test_early_stopping_stops_when_validation_loss_rises(base):
    # A learning rate this high overfits 45 rows within a few epochs.
    hp = Hyperparameters(epochs=40, patience=2, learning_rate=0.2, init_head_l2=1e-3, batch_size=8)
    out = Trainer(base).run(dataset(keyword_rows(15)), hp)  # 45 rows: 5-fold CV
    assert out.stop_reason == "early_stopping"
    runs: dict = {}
    for h in out.history:  # every run's epochs are kept, each tagged with its run
        runs.setdefault(h.get("fold", "final"), []).append(h)
    assert set(runs) == {1, 2, 3, 4, 5, "final"}
    for fold in range(1, 6):
        epochs = runs[fold]
        assert [h["epoch"] for h in epochs] == list(range(1, len(epochs) + 1))
        assert len(epochs) < 40
        assert all(not h["best"] for h in epochs[-2:])  # the patience window: no improvement
    chosen = out.report["cross_validation"]["chosen_epochs"]
    assert [h["epoch"] for h in runs["final"]] == list(range(1, max(1, chosen) + 1))
    assert all(h["final_fit"] for h in runs["final"])


def test_early_stopping_off_runs_every_epoch(base):
    hp = Hyperparameters(epochs=4, early_stopping=False, **FAST)
    out = Trainer(base).run(dataset(keyword_rows(20)), hp)
    assert out.stop_reason == "max_epochs"
    assert len(out.history) == 4


def test_given_validation_set_is_used_as_is(base):
    val = dataset(keyword_rows(4, seed=9))
    out = Trainer(base).run(
        dataset(keyword_rows(20)), Hyperparameters(epochs=2, **FAST), validation=val.examples
    )
    assert out.report["validation"] == "given"
    assert sum(c["support"] for c in out.history[0]["per_class"].values()) == 12


def test_small_datasets_use_cross_validation_then_train_on_everything(base):
    out = Trainer(base).run(dataset(keyword_rows(8)), Hyperparameters(epochs=4, **FAST))
    cv = out.report["cross_validation"]
    assert out.report["validation"] == "5-fold cross-validation"
    assert len(cv["best_epochs"]) == 5
    assert cv["chosen_epochs"] == sorted(cv["best_epochs"])[2]
    assert "trained on all rows" in cv["why"]
    assert 0 <= out.metrics["val_macro_f1"] <= 1


def test_regression_is_standardized_and_reported_in_label_units(base):
    # A lower rate than FAST: 0.05 diverges on some random tiny models (LoRA+ moves B at 4x).
    hp = Hyperparameters(epochs=3, **{**FAST, "learning_rate": 0.02})
    out = Trainer(base).run(dataset(regression_rows(80), "regression"), hp)
    assert out.status == "succeeded", out.error
    assert out.task.std > 0.5
    assert out.task.mean == pytest.approx(2.5, abs=0.6)
    assert {"val_mse", "val_mae", "val_r2"} <= set(out.metrics)
    assert out.labels == []


def test_groups_give_per_group_accuracy_and_gap(base):
    out = Trainer(base).run(
        dataset(keyword_rows(30, groups=True)), Hyperparameters(epochs=2, **FAST)
    )
    per_group = out.metrics["per_group"]
    assert set(per_group) == {"eu", "us"}
    gap = abs(per_group["eu"]["accuracy"] - per_group["us"]["accuracy"])
    assert out.metrics["group_gap"] == pytest.approx(gap, abs=1e-3)


def test_balanced_class_weights_change_training(base):
    rows = [r for r in keyword_rows(30) if r["label"] != "login"] + keyword_rows(4)[:3]
    plain = Trainer(base).run(dataset(rows), Hyperparameters(epochs=2, **FAST))
    balanced = Trainer(base).run(
        dataset(rows), Hyperparameters(epochs=2, class_weights="balanced", **FAST)
    )
    assert plain.history[0]["train_loss"] != balanced.history[0]["train_loss"]


def test_seeded_runs_are_reproducible(base):
    a = Trainer(base).run(dataset(keyword_rows(20)), Hyperparameters(epochs=2, **FAST))
    b = Trainer(base).run(dataset(keyword_rows(20)), Hyperparameters(epochs=2, **FAST))

    def strip(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert strip(a.history) == strip(b.history)
    assert a.metrics == b.metrics


def test_divergence_fails_cleanly(base):
    out = Trainer(base).run(
        dataset(keyword_rows(20)), Hyperparameters(epochs=5, learning_rate=10.0, batch_size=4)
    )
    assert out.status == "failed"
    assert out.stop_reason == "diverged"
    assert "loss" in out.error
    assert out.weights is None
    assert out.head is None


def test_cancel_stops_and_keeps_nothing(base):
    calls = {"n": 0}

    def should_cancel():
        calls["n"] += 1
        return calls["n"] > 3

    out = Trainer(base).run(
        dataset(keyword_rows(20)),
        Hyperparameters(epochs=10, **FAST),
        callbacks=TrainCallbacks(should_cancel=should_cancel),
    )
    assert out.status == "cancelled"
    assert out.stop_reason == "cancelled"
    assert out.weights is None


@pytest.mark.parametrize("trainable_layers", [None, 1])  # plain embedding, frozen-block cache
def test_cancel_stops_the_embedding_of_a_big_dataset(base, trainable_layers):
    """Embedding every text comes before any training step; a cancel must stop it too."""
    batches = {"n": 0}

    def should_cancel():
        batches["n"] += 1
        return batches["n"] > 2

    rows = keyword_rows(150)  # 450 texts: 8 batches of 64 to embed
    events = []
    out = Trainer(base).run(
        dataset(rows),
        Hyperparameters(epochs=3, trainable_layers=trainable_layers, **FAST),
        callbacks=TrainCallbacks(should_cancel=should_cancel, on_event=events.append),
    )
    assert out.status == "cancelled"
    assert batches["n"] == 3  # checked before each batch; the third check stopped it
    assert not [e for e in events if e["type"] in ("baseline", "progress")]  # never got there


def test_events_report_progress_and_epochs(base):
    events = []
    Trainer(base).run(
        dataset(keyword_rows(20)),
        Hyperparameters(epochs=2, early_stopping=False, **FAST),
        callbacks=TrainCallbacks(on_event=events.append),
    )
    kinds = [e["type"] for e in events]
    assert kinds.count("epoch") == 2
    assert "baseline" in kinds
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["step"] == progress[-1]["steps"]


def test_trainable_layers_limit_lora_to_the_top_blocks(base):
    out = Trainer(base).run(
        dataset(keyword_rows(30)),
        Hyperparameters(epochs=3, trainable_layers=1, early_stopping=False, **FAST),
    )
    if out.weights is not None:
        assert all(".layer.1." in n for n in out.weights.names)
    assert out.metrics["trainable_parameters"] == 3 * 2 * 8 * 32  # q,k,v x (A+B) x r x d


def test_unknown_target_modules_are_an_error(base):
    with pytest.raises(ValueError, match="match no Linear layer"):
        Trainer(base).run(
            dataset(keyword_rows(20)), Hyperparameters(epochs=1, target_modules=["nope"])
        )


def test_training_leaves_the_base_bit_identical_and_in_eval_mode(base):
    texts = ["refund please", "login error", "late package"]
    before = base.embed(texts)
    params = [p.detach().clone() for p in base.backbone.parameters()]
    Trainer(base).run(dataset(keyword_rows(20)), Hyperparameters(epochs=2, **FAST))
    assert torch.equal(base.embed(texts), before)
    after = list(base.backbone.parameters())  # the wrappers hold the very same tensors
    assert len(after) == len(params)
    for p, old in zip(after, params, strict=True):
        assert torch.equal(p, old)
        assert not p.requires_grad
    assert not any(m.training for m in base.backbone.modules())


def test_serving_during_training_sees_the_plain_base(base):
    texts = ["refund please", "login error"]
    before = base.embed(texts)
    done = threading.Event()
    results = []

    def train():
        Trainer(base).run(dataset(keyword_rows(30)), Hyperparameters(epochs=3, **FAST))
        done.set()

    t = threading.Thread(target=train)
    t.start()
    while not done.is_set():
        results.append(torch.equal(base.embed(texts), before))
    t.join()
    assert results
    assert all(results)


def test_training_yields_to_serving():
    gate = PriorityGate(max_wait=0.2)
    assert gate.yield_to_serving() == 0.0
    with gate.serving():
        waited = gate.yield_to_serving()
    assert waited >= 0.15
    assert gate.waited_seconds >= 0.15


def test_validation_every_n_steps_counts_for_early_stopping(base):
    hp = Hyperparameters(epochs=2, eval_every_steps=2, early_stopping=False, **FAST)
    out = Trainer(base).run(dataset(keyword_rows(20)), hp)
    partial = [h for h in out.history if h.get("partial")]
    steps_per_epoch = 6  # 48 training rows / batch 8
    # every 2 steps, except where an epoch ends: its own validation comes then (the same
    # weights evaluated twice would count twice against patience)
    ends = {steps_per_epoch, 2 * steps_per_epoch}
    assert [h["step"] for h in partial] == [
        s for s in range(2, 2 * steps_per_epoch + 1, 2) if s not in ends
    ]
    assert len(out.history) == len(partial) + 2  # plus one record per epoch
    assert len({h["step"] for h in out.history}) == len(out.history)


def test_early_stopping_shrinks_the_generalization_gap_and_says_what_it_restored(base):
    """Overfitting made visible: tiny data, many epochs, a high learning rate."""
    # B at the same rate as A: at this high rate, LoRA+'s 4x on B makes the fit jump around
    # instead of memorising the 12 rows, and memorising them is what this test needs to see.
    common = {"epochs": 25, "learning_rate": 0.05, "batch_size": 4, "patience": 3,
              "b_learning_rate_ratio": 1}  # fmt: skip
    val = dataset(keyword_rows(6, seed=7)).examples
    off = Trainer(base).run(
        dataset(keyword_rows(12)), Hyperparameters(early_stopping=False, **common), validation=val
    )
    on = Trainer(base).run(
        dataset(keyword_rows(12)), Hyperparameters(early_stopping=True, **common), validation=val
    )
    assert off.metrics["best_epoch"] == off.metrics["epochs_run"] == 25  # the last epoch is kept
    last = off.history[-1]
    assert off.metrics["generalization_gap"] == pytest.approx(
        last["val_loss"] - last["train_loss"], abs=1e-4
    )
    assert on.stop_reason == "early_stopping"
    assert on.metrics["best_epoch"] < on.metrics["epochs_run"]
    assert off.metrics["generalization_gap"] > 0.5  # train loss far below validation loss
    assert on.metrics["generalization_gap"] < off.metrics["generalization_gap"] / 4


def test_lora_plus_moves_b_at_its_multiple_of_the_learning_rate():
    """Adam's first step moves every element that has a gradient by about the learning rate: A at
    `learning_rate`, B at `b_learning_rate_ratio` times it."""
    spec = lora.LoRASpec(4, 8.0, 0.0, ("q",), None)
    w = lora.LoRAWeights(spec, {"l0.q": (6, 5), "l1.q": (6, 5)}, generator=torch.Generator())
    with torch.no_grad():
        for b in w.B:
            b.normal_(0, 0.1)  # so that A gets gradients too
    before = [p.detach().clone() for p in w.parameters()]
    x = torch.randn(3, 6)
    loss = sum(((x @ a.t()) @ b.t()).pow(2).sum() for a, b in zip(w.A, w.B, strict=True))
    hp = Hyperparameters(learning_rate=1e-3)
    opt = torch.optim.AdamW(lora_param_groups(w, hp, 4.0), weight_decay=0.0)
    loss.backward()
    opt.step()
    for (name, p), b in zip(w.named_parameters(), before, strict=True):
        step = (p.detach() - b).abs().max().item()
        assert step == pytest.approx(4e-3 if name.startswith("B") else 1e-3, rel=1e-3), name


def test_the_lora_plus_ratio_defaults_per_kind_and_changes_training(base):
    hp = Hyperparameters()
    assert hp.b_learning_rate_ratio_for("encoder") == B_RATIO_DEFAULT["encoder"]
    assert hp.b_learning_rate_ratio_for("causal_lm") == B_RATIO_DEFAULT["causal_lm"]
    assert Hyperparameters(b_learning_rate_ratio=2).b_learning_rate_ratio_for("causal_lm") == 2
    runs = [
        Trainer(base).run(
            dataset(keyword_rows(20)),
            Hyperparameters(
                epochs=2, early_stopping=False, serve="lora", b_learning_rate_ratio=r, **FAST
            ),
        )
        for r in (1.0, 8.0)
    ]
    norms = [sum(float(b.norm()) for b in out.weights.B) for out in runs]
    assert norms[1] > 2 * norms[0]  # B moved much further at 8x its learning rate
