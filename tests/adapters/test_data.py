import pytest

from loradock.adapters import tasks
from loradock.adapters.training.data import (
    DatasetError,
    check_split_feasible,
    check_validation_labels,
    parse_csv,
    parse_jsonl,
    parse_upload,
    remove_leakage,
    stratified_folds,
    stratified_split,
    validate_rows,
)
from tests.datasets import keyword_rows, regression_rows


def check(rows, task="classification", **kw):
    kw.setdefault("max_rows", 1000)
    kw.setdefault("max_text_chars", 200)
    return validate_rows(rows, tasks.get(task), **kw)


def problems_of(rows, task="classification", **kw):
    with pytest.raises(DatasetError) as info:
        check(rows, task, **kw)
    return info.value.problems, str(info.value)


GOOD = [{"text": f"text {i}", "label": "a" if i % 2 else "b"} for i in range(10)]


@pytest.mark.parametrize(
    ("bad_row", "field", "message"),
    [
        ({"text": "", "label": "a"}, "text", "empty text"),
        ({"text": "   ", "label": "a"}, "text", "empty text"),
        ({"label": "a"}, "text", "missing or not a string"),
        ({"text": 5, "label": "a"}, "text", "missing or not a string"),
        ({"text": "ok"}, "label", "missing label"),
        ({"text": "ok", "label": ""}, "label", "missing label"),
        ({"text": "ok", "label": ["a"]}, "label", "must be a string"),
        ({"text": "ok", "label": True}, "label", "must be a string"),
        ({"text": "x" * 201, "label": "a"}, "text", "exceed the limit of 200"),
        ({"text": "ok", "label": "a", "group": {"x": 1}}, "group", "must be a string"),
    ],
)
def test_bad_rows_are_named(bad_row, field, message):
    problems, text = problems_of([*GOOD[:5], bad_row, *GOOD[5:]])
    assert problems[0].row == 6  # 1-based, as a person counts
    assert problems[0].field == field
    assert message in problems[0].message
    assert "row 6" in text


def test_every_problem_is_reported_not_just_the_first():
    rows = [*GOOD, {"text": "", "label": "a"}, {"text": "ok"}]
    problems, text = problems_of(rows)
    assert [p.row for p in problems] == [11, 12]
    assert "and 1 more" in text


def test_fewer_than_two_classes():
    _, text = problems_of([{"text": f"t{i}", "label": "only"} for i in range(6)])
    assert "at least 2 are needed" in text


@pytest.mark.parametrize(
    ("n", "message"), [(0, "at least 4"), (3, "at least 4"), (11, "limit of 10")]
)
def test_dataset_size_limits(n, message):
    _, text = problems_of(GOOD[:n] if n <= 10 else GOOD + GOOD[:1], max_rows=10)
    assert message in text


def test_exact_duplicates_are_dropped_with_a_warning():
    ds = check([*GOOD, GOOD[0], GOOD[1]])
    assert len(ds.examples) == 10
    assert ds.dropped_duplicates == 2
    assert "dropped 2 exact duplicate" in ds.warnings[0]


def test_a_text_with_conflicting_labels_is_dropped_with_a_warning_naming_its_rows():
    rows = [*GOOD, {"text": "text 1", "label": "b"}, {"text": " text 1", "label": "a"}]
    ds = check(rows)  # "text 1" is labelled "a" in row 2, "b" in row 11, "a" again in row 12
    assert [e.text for e in ds.examples] == [f"text {i}" for i in range(10) if i != 1]
    assert ds.dropped_conflicts == 3
    [warning] = ds.warnings
    assert "dropped 3 rows of 1 texts with conflicting labels: rows 2, 11, 12 ('a' vs 'b')" in (
        warning
    )
    assert "on_conflict='reject'" in warning


def test_conflicting_labels_are_rejected_when_asked():
    rows = [*GOOD, {"text": "text 1", "label": "b"}]  # "text 1" is labelled "a" in row 2
    problems, _ = problems_of(rows, on_conflict="reject")
    assert problems[0].row == 11
    assert "same text as row 2" in problems[0].message
    assert "ambiguous" in problems[0].message


def test_imbalance_warning():
    rows = [{"text": f"a{i}", "label": "a"} for i in range(40)] + [
        {"text": f"b{i}", "label": "b"} for i in range(3)
    ]
    ds = check(rows)
    assert any("imbalanced" in w for w in ds.warnings)


def test_integer_labels_become_class_names():
    ds = check([{"text": f"t{i}", "label": i % 2} for i in range(6)])
    assert ds.labels == ["0", "1"]


@pytest.mark.parametrize("label", ["abc", None, float("nan"), float("inf"), True])
def test_regression_labels_must_be_finite_numbers(label):
    rows = [*regression_rows(8), {"text": "odd one", "label": label}]
    problems, _ = problems_of(rows, "regression")
    assert problems[0].row == 9
    assert problems[0].field == "label"


def test_regression_accepts_numeric_strings():
    ds = check([{"text": f"t{i}", "label": str(i)} for i in range(6)], "regression")
    assert [e.label for e in ds.examples] == [float(i) for i in range(6)]


def test_class_too_small_to_split():
    ds = check([*GOOD, {"text": "lonely", "label": "c"}])
    with pytest.raises(DatasetError, match="'c' \\(1\\)"):
        check_split_feasible(ds)


def test_validation_labels_must_be_known():
    train = check(GOOD)
    val = check([{"text": "v1", "label": "a"}, {"text": "v2", "label": "zzz"}], min_rows=2)
    with pytest.raises(DatasetError) as info:
        check_validation_labels(train, val)
    assert info.value.problems[0].dataset == "validation_data"
    assert info.value.problems[0].row == 2


def test_leakage_between_train_and_validation_is_removed():
    train = check(GOOD)
    val = check([{"text": "text 3", "label": "a"}, {"text": "new", "label": "b"}], min_rows=2)
    assert remove_leakage(train, val) == 1
    assert all(e.text != "text 3" for e in train.examples)


def test_stratified_split_keeps_every_class_on_both_sides():
    ds = check(keyword_rows(10))
    train, val = stratified_split(ds.examples, tasks.get("classification"), 0.2, seed=1)
    assert len(train) + len(val) == 30
    assert {e.label for e in val} == {e.label for e in train} == set(ds.labels)
    assert len(val) == 6
    again = stratified_split(ds.examples, tasks.get("classification"), 0.2, seed=1)
    assert [e.text for e in again[1]] == [e.text for e in val]  # seeded


def test_stratified_split_of_regression_spans_the_range():
    ds = check(regression_rows(50), "regression")
    _, val = stratified_split(ds.examples, tasks.get("regression"), 0.2, seed=0)
    assert 8 <= len(val) <= 12
    assert min(e.label for e in val) < 1.5
    assert max(e.label for e in val) > 3.5


def test_folds_partition_the_rows():
    ds = check(keyword_rows(5))
    folds = stratified_folds(ds.examples, tasks.get("classification"), 5, seed=0)
    assert len(folds) == 5
    held = [e.text for _, val in folds for e in val]
    assert sorted(held) == sorted(e.text for e in ds.examples)
    for train, val in folds:
        assert not {e.text for e in train} & {e.text for e in val}
        assert {e.label for e in val} == set(ds.labels)  # each class in each fold


def test_parse_jsonl_and_csv():
    jsonl = b'{"text": "a b", "label": "x"}\n\n{"text": "c", "label": "y", "group": "g"}\n'
    assert parse_jsonl(jsonl)[1] == {"text": "c", "label": "y", "group": "g"}
    csv_raw = b'text,label,group\n"hello, world",x,g1\nbye,y,\n'
    rows = parse_csv(csv_raw)
    assert rows[0] == {"text": "hello, world", "label": "x", "group": "g1"}
    assert parse_upload(csv_raw, "data.csv") == rows
    assert parse_upload(jsonl, None)[0]["label"] == "x"


def test_parse_errors_name_the_line():
    with pytest.raises(DatasetError, match="row 2"):
        parse_jsonl(b'{"text": "a", "label": "x"}\n{not json}\n')
    with pytest.raises(DatasetError, match="JSON object"):
        parse_jsonl(b"[1, 2]\n")
    with pytest.raises(DatasetError, match="missing \\['label'\\]"):
        parse_csv(b"text,category\nhello,x\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        parse_csv(b"text,label\n\xff\xfe,x\n")


def parquet_bytes(columns):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def test_parquet_uploads_give_rows_with_list_columns_for_multilabel():
    raw = parquet_bytes({
        "text": ["refund please", "login broken", "hello"],
        "labels": [["billing"], ["login", "urgent"], []],
        "extra": [1, 2, 3],
    })  # fmt: skip
    rows = parse_upload(raw, "train.parquet")
    assert rows == [
        {"text": "refund please", "labels": ["billing"]},
        {"text": "login broken", "labels": ["login", "urgent"]},
        {"text": "hello", "labels": []},
    ]
    assert parse_upload(raw, None) == rows  # told by its magic bytes without a name
    with pytest.raises(DatasetError, match="no text column"):
        parse_upload(parquet_bytes({"body": ["x"]}), "x.parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        parse_upload(b"PAR1 but broken", "x.parquet")


def test_label_ids_are_mapped_to_names_when_given():
    rows = [{"text": f"refund {i}", "label": 0} for i in range(3)]
    rows += [{"text": f"login {i}", "label": "1"} for i in range(3)]
    rows += [{"text": "shipping by name", "label": "shipping"}, {"text": "ship", "label": 2}]
    ds = check(rows, label_names=["billing", "login", "shipping"])
    assert ds.labels == ["billing", "login", "shipping"]
    assert {e.label for e in ds.examples} == {"billing", "login", "shipping"}
    same = check(rows, label_names={"0": "billing", "1": "login", "2": "shipping"})
    assert [e.label for e in same.examples] == [e.label for e in ds.examples]
    problems, _ = problems_of([*rows, {"text": "odd", "label": 7}], label_names=["a", "b", "c"])
    # "shipping" (row 7) is no name of these, 7 (row 9) no id
    assert [p.row for p in problems] == [7, 9]
    assert all("neither an id nor a name" in p.message for p in problems)
    multi = check(
        [{"text": f"t{i}", "labels": [0, 2] if i % 2 else [1]} for i in range(6)],
        "multilabel", label_names=["x", "y", "z"],
    )  # fmt: skip
    assert {e.label for e in multi.examples} == {("x", "z"), ("y",)}
    with pytest.raises(DatasetError, match="distinct"):
        check(rows, label_names=["same", "same"])
