"""The multi-label task: row formats, the long layout united, metrics equal to scikit-learn's,
the probe equal to one-vs-rest logistic regression, thresholds calibrated only when that helps
out of sample, and a real training run on the tiny model."""

import json

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, hamming_loss

from loradock.adapters import tasks
from loradock.adapters.core.base import BaseModel
from loradock.adapters.tasks.multilabel import MultiLabel
from loradock.adapters.tasks.probe import fit_linear, l2_for
from loradock.adapters.training.data import (
    DatasetError,
    Example,
    parse_csv,
    stratified_split,
    validate_rows,
)
from loradock.adapters.training.hyperparameters import Hyperparameters
from loradock.adapters.training.trainer import Trainer
from tests.datasets import multilabel_rows


def validate(rows, **kw):
    return validate_rows(rows, MultiLabel, max_rows=10_000, max_text_chars=1000, **kw)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["b", "a", "b"], ("a", "b")),
        (("x",), ("x",)),
        ([], ()),
        ("a|b", ("a", "b")),
        (" a | b |", ("a", "b")),
        ('["b", "a"]', ("a", "b")),
        ("solo", ("solo",)),
        ("", ()),
        (3, ("3",)),
        ([1, "a"], ("1", "a")),
    ],
)
def test_labels_come_as_lists_pipes_json_cells_or_one_name(value, expected):
    assert MultiLabel.parse_label(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": 1}, "list of label names"),
        ([True], "string"),
        (["a", ""], "empty label"),
        (["x" * 200], "longer than"),
        ("[not json", "JSON array"),
        (1.5, "list of label names"),
        ([["nested"]], "string"),
    ],
)
def test_bad_label_values_are_row_problems(value, message):
    with pytest.raises(ValueError, match=message):
        MultiLabel.parse_label(value)
    rows = [*multilabel_rows(12), {"text": "odd one", "labels": value}]
    with pytest.raises(DatasetError) as err:
        validate(rows)
    assert err.value.problems[0].row == 13
    assert err.value.problems[0].field == "label"


def test_the_long_layout_is_united_per_text_and_duplicates_dropped():
    rows = [
        {"text": "refund my card", "label": "billing"},
        {"text": "refund my card", "label": "urgent"},
        {"text": "refund my card", "label": "billing"},  # an exact duplicate of row 1
        {"text": "lost password", "label": "login"},
        {"text": "lost password", "label": "login"},
        {"text": "where is it", "labels": []},
        {"text": "hello", "label": "urgent"},
    ]
    ds = validate(rows)
    by_text = {e.text: e.label for e in ds.examples}
    assert by_text == {
        "refund my card": ("billing", "urgent"),
        "lost password": ("login",),
        "where is it": (),
        "hello": ("urgent",),
    }
    assert ds.labels == ["billing", "login", "urgent"]
    assert ds.dropped_duplicates == 1
    assert ds.dropped_conflicts == 0  # united, not dropped
    assert any("united into one row" in w and "3 rows of 1 texts" in w for w in ds.warnings)


def test_a_csv_labels_column_with_pipes_and_empty_cells():
    raw = b"text,labels\nrefund my card,billing|urgent\nhello there,\nlost password,login\n"
    rows = parse_csv(raw)
    rows += [{"text": f"filler {i}", "labels": "login" if i % 2 else ""} for i in range(4)]
    ds = validate(rows)
    by_text = {e.text: e.label for e in ds.examples}
    assert by_text["refund my card"] == ("billing", "urgent")
    assert by_text["hello there"] == ()  # an empty cell is the empty set, not a missing label


def test_data_with_nothing_to_learn_is_refused_with_the_reason():
    with pytest.raises(DatasetError, match="no row has a label"):
        validate([{"text": f"t{i}", "labels": []} for i in range(6)])
    with pytest.raises(DatasetError, match="same labels"):
        validate([{"text": f"t{i}", "labels": ["a", "b"]} for i in range(6)])
    # unknown labels in a validation set are named (the model could never predict them)
    train = validate(multilabel_rows(30))
    val = validate([{"text": "x y", "labels": ["billing", "cooking"]}, *multilabel_rows(6, 1)],
                   dataset="validation_data")  # fmt: skip
    problems = MultiLabel.validation_problems(train, val)
    assert [(p.row, "cooking" in p.message) for p in problems] == [(1, True)]


def test_splits_keep_rare_labels_on_both_sides():
    rows = multilabel_rows(60)
    rows += [{"text": f"rare thing {i}", "labels": ["rare"]} for i in range(4)]
    ds = validate(rows)
    tr, va = stratified_split(ds.examples, MultiLabel, 0.25, seed=0)
    assert any("rare" in e.label for e in tr)
    assert any("rare" in e.label for e in va)
    assert len(tr) + len(va) == len(ds.examples)


def _random_problem(n=80, labels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = [f"l{j}" for j in range(labels)]
    truth = torch.rand(n, labels, generator=g) < 0.35
    examples = [
        Example(text=f"t{i}", label=tuple(names[j] for j in range(labels) if truth[i, j]))
        for i in range(n)
    ]
    return MultiLabel(names), examples, truth, g


def test_metrics_equal_scikit_learn():
    task, examples, truth, g = _random_problem()
    logits = torch.randn(len(examples), task.n_outputs, generator=g) + truth.float()
    m = task.metrics(logits, examples)
    pred = (torch.sigmoid(logits) >= 0.5).numpy()
    y = truth.numpy()
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)  # subset accuracy
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred), abs=1e-6)
    per = f1_score(y, pred, average=None)
    assert [m["per_class"][f"l{j}"]["f1"] for j in range(4)] == pytest.approx(per, abs=1e-4)
    # the reported loss is the training loss: BCE summed over labels, mean over rows
    assert m["loss"] == pytest.approx(float(task.loss(logits, task.targets(examples))), rel=1e-5)


def test_the_probe_is_one_vs_rest_logistic_regression():
    task, examples, truth, g = _random_problem(n=120, labels=3, seed=1)
    x = torch.randn(len(examples), 6, generator=g) + 1.5 * truth.float() @ torch.randn(
        3, 6, generator=g
    )
    y = task.targets(examples)
    c = 0.3
    head = fit_linear(x, y, task, l2=l2_for(c, len(x)), max_iter=500)
    ours = torch.sigmoid(head(x))
    for j in range(3):
        ref = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(x.numpy(), truth[:, j].numpy())
        theirs = torch.tensor(ref.predict_proba(x.numpy())[:, 1], dtype=torch.float32)
        assert torch.allclose(ours[:, j], theirs, atol=2e-3), j


def test_thresholds_are_tuned_when_that_helps_out_of_sample():
    """A model whose probabilities are right in order but too low (as BCE makes them for rare
    labels): 0.5 misses most positives, a tuned threshold finds them."""
    task, examples, truth, g = _random_problem(n=200, seed=2)
    logits = torch.where(truth, -0.3, -2.5) + 0.3 * torch.randn(truth.shape, generator=g)
    report = task.calibrate(logits, examples)
    assert report["applied"] is True
    assert report["micro_f1_cross_fitted"] > report["micro_f1_at_0.5"] + 0.3
    assert all(t < 0.5 for t in task.thresholds)
    tuned = task.metrics(logits, examples)["micro_f1"]
    assert tuned > report["micro_f1_at_0.5"] + 0.3
    assert task.decode(logits[0])["labels"] == sorted(
        examples[0].label, key=lambda name: -float(logits[0, int(name[1])])
    )
    # and the thresholds travel with the artifact
    assert tasks.from_meta({"task": "multilabel", **task.meta()}) == task


def test_thresholds_stay_at_one_half_when_tuning_does_not_generalize():
    task, examples, truth, g = _random_problem(n=200, seed=3)
    well_calibrated = torch.where(truth, 3.0, -3.0) + 0.5 * torch.randn(truth.shape, generator=g)
    report = task.calibrate(well_calibrated, examples)
    assert report["applied"] is False
    assert task.thresholds == [0.5] * task.n_outputs
    few = task.calibrate(well_calibrated[:10], examples[:10])
    assert few["applied"] is False
    assert "10 out-of-sample rows" in few["why"]


def test_feedback_labels_and_prediction_values_are_canonical_sets():
    task = MultiLabel(["a", "b", "c"])
    assert task.check_feedback_label(["c", "a"]) == "a|c"
    assert task.check_feedback_label("c|a") == "a|c"
    assert task.check_feedback_label([]) == ""
    assert task.prediction_value({"labels": ["c", "a"]}) == "a|c"
    with pytest.raises(ValueError, match="'z' is not a label"):
        task.check_feedback_label(["a", "z"])


def test_drift_sees_a_change_in_the_label_mix():
    task, _examples, truth, _g = _random_problem(n=300, seed=4)
    logits = torch.where(truth, 2.0, -2.0)
    profile = json.loads(json.dumps(task.profile(logits)))  # stored as JSON
    same = task.drift_signals(profile, [task.decode(r) for r in logits])
    assert all(s["psi"] == 0 for s in same.values())
    nothing = [task.decode(torch.full((4,), -5.0)) for _ in range(300)]
    shifted = task.drift_signals(profile, nothing)
    assert shifted["predicted_label"]["psi"] > 1.0
    assert shifted["label_count"]["current"]["0"] == 1.0


def test_trains_on_the_tiny_model_and_serves_label_sets(tiny_bert_dir):
    base = BaseModel.load(tiny_bert_dir, device="cpu", dtype="float32", max_length=32)
    ds = validate(multilabel_rows(120))
    hp = Hyperparameters(learning_rate=0.05, init_head_l2=0.001, batch_size=16, epochs=3)
    out = Trainer(base).run(ds, hp)
    assert out.status == "succeeded", out.error
    for key in ("val_micro_f1", "val_macro_f1", "val_accuracy", "val_hamming_loss"):
        assert key in out.metrics
        assert key in out.baseline
    assert out.baseline["kind"] == "linear_probe"
    assert "cv_micro_f1" in out.baseline
    assert out.winner in ("lora", "probe")
    assert "applied" in out.report["calibration"]
    # the keyword topics are learnable: the served kind beats chance (label frequency ~0.5)
    served = out.metrics if out.winner == "lora" else out.baseline
    assert served["val_micro_f1"] > 0.7
    meta = out.task.meta()
    assert len(meta["thresholds"]) == len(meta["labels"]) == 3
