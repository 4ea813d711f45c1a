"""The task plugins: one table of cases drives every registered task through the interface,
macro-F1 matches scikit-learn's, and no module outside adapters/tasks branches on a task name."""

import ast
import random
import re
from pathlib import Path

import pytest
import torch
from sklearn.metrics import f1_score

from loradock.adapters import tasks
from loradock.adapters.tasks.metrics import classification_metrics
from loradock.adapters.training.data import stratified_fold_ids, validate_rows
from tests.datasets import keyword_rows, multilabel_rows, regression_rows

ROOT = Path(__file__).resolve().parents[2]
ROWS = {
    "classification": keyword_rows(6),
    "regression": regression_rows(24),
    "multilabel": multilabel_rows(24),
    "generation": [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i % 3}"},
            ]
        }
        for i in range(8)
    ]
    + [{"prompt": "say yes", "completion": " yes"}],
}
HEAD_TASKS = [name for name in tasks.names() if tasks.get(name).has_head]


def dataset(name):
    return validate_rows(ROWS[name], tasks.get(name), max_rows=1000, max_text_chars=1000)


def test_every_known_task_is_registered():
    assert tasks.names() == ["classification", "regression", "multilabel", "generation"]
    assert tasks.for_base("encoder") == ["classification", "regression", "multilabel"]
    assert tasks.for_base("causal_lm") == ["generation"]
    with pytest.raises(tasks.UnknownTask, match="classification"):
        tasks.get("summarization")


@pytest.mark.parametrize("name", tasks.names())
def test_a_task_round_trips_through_its_artifact_section(name):
    ds = dataset(name)
    task = ds.task.from_dataset(ds)
    meta = {"task": name, **task.meta()}
    assert tasks.from_meta(meta) == task
    broken = {"task": name, **{k: "nonsense" for k in task.meta()}}
    with pytest.raises(tasks.TaskStateError):
        tasks.from_meta(broken)


@pytest.mark.parametrize("name", HEAD_TASKS)
def test_a_task_trains_scores_decodes_and_profiles_consistently(name):
    ds = dataset(name)
    task = ds.task.from_dataset(ds)
    n = len(ds.examples)
    outputs = torch.randn(n, task.n_outputs, generator=torch.Generator().manual_seed(0))
    targets = task.targets(ds.examples)
    assert targets.shape[0] == n
    loss = task.loss(outputs, targets)
    assert loss.dim() == 0
    m = task.metrics(outputs, ds.examples)
    assert m["loss"] == pytest.approx(float(loss), rel=1e-5)  # validation loss = training loss
    summary = task.summary(m)
    assert type(task).decision_metric in summary
    assert type(task).better(summary, {}) is True
    assert type(task).better({}, summary) is False
    predictions = [task.decode(row) for row in outputs]
    assert all(isinstance(task.prediction_value(p), str) for p in predictions)
    tensors = task.output_tensors(predictions)
    assert all(t["shape"][0] == n for t in tensors)
    assert all(t["shape"][0] == -1 for t in task.output_tensors([]))
    profile = task.profile(outputs)
    same = task.drift_signals(profile, predictions)
    assert same, "a task reports at least one prediction signal"
    assert all(sig["psi"] == pytest.approx(0.0, abs=1e-9) for sig in same.values())


@pytest.mark.parametrize("name", tasks.names())
def test_better_compares_the_decision_metric_in_the_right_direction(name):
    task = tasks.get(name)
    key = task.decision_metric
    hi, lo = {key: 0.9}, {key: 0.1}
    assert task.better(hi, lo) is task.higher_is_better
    assert task.better(lo, hi) is not task.higher_is_better
    assert task.better(hi, hi) is False  # a tie never wins
    assert task.better({key: float("nan")}, lo) is False


def test_macro_f1_matches_scikit_learn_over_random_cases():
    rng = random.Random(0)
    for case in range(300):
        n_classes = rng.randint(2, 6)
        n = rng.randint(1, 30)
        truth = [rng.randrange(n_classes) for _ in range(n)]
        pred = [rng.randrange(n_classes) for _ in range(n)]
        if case % 3 == 0:  # classes predicted that never occur in the truth, and vice versa
            pred = [rng.randrange(n_classes - 1) + 1 for _ in range(n)]
            truth = [0 if rng.random() < 0.5 else t for t in truth]
        logits = torch.full((n, n_classes), -5.0)
        logits[torch.arange(n), torch.tensor(pred)] = 5.0
        labels = [f"c{i}" for i in range(n_classes)]
        ours = classification_metrics(logits, torch.tensor(truth), labels)["macro_f1"]
        theirs = f1_score(truth, pred, average="macro", zero_division=0)
        assert ours == pytest.approx(theirs, abs=1e-6), (truth, pred)


def test_a_predicted_class_absent_from_validation_counts_against_macro_f1():
    # truth: a a b b; predicted: a c b b -> F1 a = 2/3, b = 1, c = 0 -> macro 0.5556 (not 0.8333)
    logits = torch.full((4, 3), -5.0)
    logits[torch.arange(4), torch.tensor([0, 2, 1, 1])] = 5.0
    m = classification_metrics(logits, torch.tensor([0, 0, 1, 1]), ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3, abs=1e-6)


def test_fold_ids_are_stratified():
    strata = ["a"] * 9 + ["b"] * 6 + ["c"] * 3
    folds = stratified_fold_ids(strata, 3, seed=4)
    for k in range(3):
        held = [s for s, f in zip(strata, folds, strict=True) if f == k]
        assert sorted(held) == ["a", "a", "a", "b", "b", "c"]


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_adapters_never_import_the_service_or_its_frameworks():
    forbidden = ("loradock.service", "fastapi", "starlette", "sqlalchemy", "prometheus_client")
    for path in (ROOT / "adapters").rglob("*.py"):
        bad = [m for m in imports_of(path) if m.startswith(forbidden)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_task_plugins_name_tasks():
    """No module outside adapters/tasks compares with, or branches on, a task's name."""
    names = "|".join(tasks.names())
    literal = re.compile(rf"""["']({names})["']""")
    offenders = []
    for top in ("adapters", "service"):
        for path in (ROOT / top).rglob("*.py"):
            if path.is_relative_to(ROOT / "adapters" / "tasks"):
                continue
            for i, line in enumerate(path.read_text().splitlines(), start=1):
                if literal.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
