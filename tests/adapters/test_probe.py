"""The linear-probe baseline: as good as a standard, tuned logistic regression, and the rules
that decide what a version serves (ties, `serve`, the refit on all rows)."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from loradock.adapters import tasks
from loradock.adapters.core.base import BaseModel
from loradock.adapters.tasks.probe import C_GRID, fit_linear, fit_probe, l2_for
from loradock.adapters.training.data import validate_rows
from loradock.adapters.training.trainer import Hyperparameters, Trainer, TrainOutcome
from tests.datasets import keyword_rows

FAST = {"learning_rate": 0.05, "init_head_l2": 1e-3, "batch_size": 8}


def gaussian_problem(n_train=240, n_test=600, classes=4, dim=24, seed=0):
    """Classes as Gaussian blobs with unequal feature scales: a problem where regularization and
    standardization both matter."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(classes, dim)) * 0.6
    scales = np.exp(g.normal(size=dim))

    def sample(n):
        y = g.integers(0, classes, n)
        x = (centres[y] + g.normal(size=(n, dim)) * 1.2) * scales + 3.0
        return x.astype(np.float32), y

    return sample(n_train), sample(n_test)


def as_dataset(y):
    rows = [{"text": f"row {i}", "label": f"c{v}"} for i, v in enumerate(y)]
    data = validate_rows(rows, tasks.get("classification"), max_rows=10**6, max_text_chars=100)
    task = tasks.get("classification").from_dataset(data)
    return data, task


def test_a_fixed_C_fits_the_same_model_as_scikit_learn():
    (x, y), _ = gaussian_problem()
    data, task = as_dataset(y)
    targets = task.targets(data.examples)
    xt = torch.from_numpy(x)
    for c in (0.01, 1.0):
        head = fit_linear(xt, targets, task, l2=l2_for(c, len(y)), standardize=True, max_iter=500)
        ours = torch.softmax(head(xt), dim=1).numpy()
        ref = LogisticRegression(C=c, max_iter=5000, tol=1e-8)
        ref.fit(StandardScaler().fit_transform(x), [f"c{v}" for v in y])
        theirs = ref.predict_proba(StandardScaler().fit_transform(x))
        assert list(ref.classes_) == task.labels
        assert np.abs(ours - theirs).max() < 2e-3, c


def test_the_probe_is_as_good_as_a_grid_searched_logistic_regression():
    """The reference is what a practitioner runs: scikit-learn's standardize + logistic
    regression, C grid-searched by 5-fold CV on macro-F1 (standardized, it converges in ~1 s;
    unstandardized it took 13-85 s and was a weaker reference)."""
    for seed in (0, 1, 2):
        (x, y), (x_te, y_te) = gaussian_problem(seed=seed)
        data, task = as_dataset(y)
        head, settings = fit_probe(
            torch.from_numpy(x), task.targets(data.examples), task, examples=data.examples
        )
        assert settings["C"] in C_GRID
        assert settings["cv_folds"] == 5
        assert settings["standardized"]
        ours = f1_score(y_te, head(torch.from_numpy(x_te)).argmax(1).numpy(), average="macro")
        grid = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
            {"logisticregression__C": np.logspace(-3, 3, 13)},
            cv=StratifiedKFold(5, shuffle=True, random_state=0),
            scoring="f1_macro",
        ).fit(x, y)
        theirs = f1_score(y_te, grid.predict(x_te), average="macro")
        assert ours >= theirs - 0.03, (seed, ours, theirs, settings)


def test_a_heavily_regularized_probe_loses_to_the_chosen_one_on_held_out_rows():
    (x, y), (x_te, y_te) = gaussian_problem(seed=2)
    data, task = as_dataset(y)
    xt, targets = torch.from_numpy(x), task.targets(data.examples)
    chosen, settings = fit_probe(xt, targets, task, examples=data.examples)
    weakest = fit_linear(xt, targets, task, l2=l2_for(C_GRID[0], len(y)), standardize=True)

    def score(head):
        return f1_score(y_te, head(torch.from_numpy(x_te)).argmax(1).numpy(), average="macro")

    assert settings["C"] > C_GRID[0]
    assert score(chosen) > score(weakest)


@pytest.fixture
def base(tiny_bert_dir):
    return BaseModel.load(tiny_bert_dir, device="cpu")


def dataset(rows):
    return validate_rows(rows, tasks.get("classification"), max_rows=10_000, max_text_chars=1000)


def test_serve_probe_trains_no_lora_and_refits_the_probe_on_every_row(base):
    events = []
    from loradock.adapters.training.trainer import TrainCallbacks

    data = dataset(keyword_rows(30))
    out = Trainer(base).run(
        data,
        Hyperparameters(serve="probe", **FAST),
        callbacks=TrainCallbacks(on_event=events.append),
    )
    assert out.status == "succeeded"
    assert out.winner == "probe"
    assert out.weights is None
    assert out.history == []
    assert not [e for e in events if e["type"] == "progress"]
    assert "serve='probe'" in out.winner_reason
    assert out.served_metrics()["model"] == "probe"
    # The served head is the chosen C refit on all 90 rows, not the fit on the training part.
    assert "all 90 rows" in out.report["probe_refit"]
    task = out.task
    x = base.embed([e.text for e in data.examples]).float()
    expected = task.refit_baseline(x, task.targets(data.examples), out.baseline)
    assert torch.allclose(out.head.weight, expected.weight, atol=3e-3)
    assert len(out.reference_texts) == len(out.reference_outputs) == 18  # out-of-sample outputs


def test_serve_lora_serves_lora_whatever_the_probe_scores(base):
    out = Trainer(base).run(
        dataset(keyword_rows(30)), Hyperparameters(serve="lora", epochs=2, **FAST)
    )
    assert out.winner == "lora"
    assert out.weights is not None
    assert "serve='lora'" in out.winner_reason
    assert "probe_refit" not in out.report


def outcome(lora, probe, best_epoch=3):
    task = tasks.get("classification")(["a", "b"])
    out = TrainOutcome(status="running", stop_reason=None, task=task)
    out.metrics = {"best_epoch": best_epoch, **lora}
    out.baseline = dict(probe)
    out.weights = object()  # type: ignore[assignment]  # "LoRA was trained"
    return out


@pytest.mark.parametrize(
    ("lora", "probe", "winner"),
    [
        # a clear win either way: the decision metric decides
        ({"val_macro_f1": 0.80, "val_loss": 0.9}, {"val_macro_f1": 0.70, "val_loss": 0.5}, "lora"),
        ({"val_macro_f1": 0.70, "val_loss": 0.2}, {"val_macro_f1": 0.80, "val_loss": 0.9}, "probe"),
        # within one of 50 validation texts (0.02): the lower validation loss decides
        ({"val_macro_f1": 0.79, "val_loss": 0.3}, {"val_macro_f1": 0.80, "val_loss": 0.9}, "lora"),
        ({"val_macro_f1": 0.80, "val_loss": 0.9}, {"val_macro_f1": 0.80, "val_loss": 0.3}, "probe"),
    ],
)
def test_ties_on_the_decision_metric_go_to_the_lower_validation_loss(lora, probe, winner):
    out = outcome(lora, probe)
    head = object()
    Trainer._pick_winner(None, out, head, Hyperparameters(), 50)  # type: ignore[arg-type]
    assert out.winner == winner, out.winner_reason
    assert (out.head is head) == (winner == "probe")
    if abs(lora["val_macro_f1"] - probe["val_macro_f1"]) <= 0.02:
        assert "validation loss decides" in out.winner_reason


def test_lora_that_never_improved_is_not_served_even_on_a_tie():
    out = outcome({"val_macro_f1": 0.8, "val_loss": 0.1}, {"val_macro_f1": 0.8, "val_loss": 0.9}, 0)
    Trainer._pick_winner(None, out, object(), Hyperparameters(), 50)  # type: ignore[arg-type]
    assert out.winner == "probe"
