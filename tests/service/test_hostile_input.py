"""Hostile and careless input (issue 13): every malformed request is a 4xx naming the problem,
the server keeps serving, and nothing of another tenant's is affected."""

import json

import pytest

from tests.datasets import keyword_rows
from tests.service.test_app import assert_problem
from tests.service.test_predict_api import TEXTS, predict, trained
from tests.service.test_training_api import store_keys

SURROGATE = '"refund \\ud800 please"'  # valid JSON, a lone surrogate: not encodable as UTF-8


def post_raw(client, path, body: str):
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def test_lone_surrogates_are_422_on_every_route(app_client):
    trained(app_client)
    before = predict(app_client, "tickets", TEXTS).json()["predictions"]
    keys = store_keys(app_client)
    resp = post_raw(app_client, "/v1/adapters/tickets/predict",
                    f'{{"inputs": ["fine", {SURROGATE}]}}')  # fmt: skip
    assert_problem(resp, 422, "inputs[1]: character 7 is a lone surrogate (U+D800)")
    tensor = f'{{"name": "text", "datatype": "BYTES", "shape": [1], "data": [{SURROGATE}]}}'
    infer = f'{{"inputs": [{tensor}]}}'
    resp = post_raw(app_client, "/v2/models/tickets/infer", infer)
    assert resp.status_code == 400, resp.text  # the OIP's status for invalid inputs
    assert "inputs[0]: character 7 is a lone surrogate" in resp.json()["error"]
    rows = json.dumps(keyword_rows(5))[:-1] + f', {{"text": {SURROGATE}, "label": "billing"}}]'
    resp = post_raw(app_client, "/v1/adapters", f'{{"name": "bad", "training_data": {rows}}}')
    assert_problem(resp, 422, "row 16 field 'text': character 7 is a lone surrogate")
    label = json.dumps(keyword_rows(5))[:-1] + ', {"text": "ok", "label": "\\udfff"}]'
    resp = post_raw(app_client, "/v1/adapters", f'{{"name": "bad", "training_data": {label}}}')
    assert_problem(resp, 422, "row 16 field 'label'")
    assert [a["name"] for a in app_client.get("/v1/adapters").json()["adapters"]] == ["tickets"]
    assert store_keys(app_client) == keys
    assert predict(app_client, "tickets", TEXTS).json()["predictions"] == before


def test_requests_over_the_token_cap_are_422(app_client):
    trained(app_client)
    app_client.app.state.runtime.settings.max_request_tokens = 100
    resp = predict(app_client, "tickets", ["refund " * 200, "refund " * 200])
    assert_problem(resp, 422, "the limit is 100 per request (setting LORADOCK_MAX_REQUEST_TOKENS)")
    assert predict(app_client, "tickets", ["refund"]).status_code == 200


DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000


def multipart(client, path, files, **fields):
    return client.post(path, files=files, data=fields)


def test_malformed_bodies_are_4xx_naming_the_problem(app_client):
    trained(app_client)
    rows = json.dumps(keyword_rows(5))
    cases = [
        ("/v1/adapters", f'{{"name": "x", "training_data": {DEEP}}}', 422, "nested more than"),
        ("/v1/adapters/tickets/versions", f'{{"training_data": {DEEP}}}', 422, "nested more than"),
        ("/v1/adapters", f'{{"name": "x", "training_data": {rows}, "seed": {HUGE}}}', 422,
         "a number is too large"),
        ("/v2/models/tickets/infer", f'{{"inputs": {DEEP}}}', 400, "nested more than"),
        ("/v2/models/tickets/infer", f'{{"inputs": [], "id": {HUGE}}}', 400, "too large"),
        ("/v1/adapters/tickets/predict", f'{{"inputs": {DEEP}}}', 400, None),
        ("/v1/adapters/tickets/predict", f'{{"inputs": ["a"], "version": {HUGE}}}', 400, None),
    ]  # fmt: skip
    for path, body, status, detail in cases:
        resp = post_raw(app_client, path, body)
        assert resp.status_code == status, (path, resp.text[:300])
        text = resp.json().get("detail") or resp.json().get("error")
        if detail:
            assert detail in text, (path, text)
    assert predict(app_client, "tickets", TEXTS).status_code == 200


def test_malformed_uploads_are_422_naming_the_line(app_client):
    deep_line = '{"text": "a", "label": ' + DEEP + "}\n"
    resp = multipart(app_client, "/v1/adapters",
                     {"training_file": ("t.jsonl", deep_line.encode())}, name="x")  # fmt: skip
    assert_problem(resp, 422, "nested more than 64 levels")
    huge = "".join(json.dumps(r) + "\n" for r in keyword_rows(5))
    huge += '{"text": "big", "label": ' + HUGE + "}\n"
    resp = multipart(app_client, "/v1/adapters", {"training_file": ("t.jsonl", huge.encode())},
                     name="x", task="regression")  # fmt: skip
    assert_problem(resp, 422, "a number is too large")
    rows = "".join(json.dumps(r) + "\n" for r in keyword_rows(5)).encode()
    resp = multipart(app_client, "/v1/adapters", {"training_file": ("t.jsonl", rows)},
                     name="x", hyperparameters='{"seed": ' + DEEP + "}")  # fmt: skip
    assert_problem(resp, 422, "hyperparameters: not a JSON object: nested")
    long_field = "text,label\n" + "x" * 200_000 + ",a\n" + "ok,b\n" * 6
    resp = multipart(app_client, "/v1/adapters",
                     {"training_file": ("t.csv", long_field.encode())}, name="x")  # fmt: skip
    assert_problem(resp, 422, "row 1 field 'text': 200000 characters exceed the limit")
    unbalanced = 'text,label\n"refund please,billing\nok,login\n'
    resp = multipart(app_client, "/v1/adapters",
                     {"training_file": ("t.csv", unbalanced.encode())}, name="x")  # fmt: skip
    assert resp.status_code == 422, resp.text
    resp = app_client.post(
        "/v1/adapters",
        files=[("training_file", ("a.jsonl", rows)), ("name", (None, "x")), ("name", (None, "y"))],
    )
    assert_problem(resp, 422, "the form field 'name' is given more than once")
    assert app_client.get("/v1/adapters").json()["adapters"] == []


def test_a_regression_label_too_large_for_a_float_is_422(app_client):
    rows = [{"text": f"t {i}", "label": i} for i in range(8)] + [{"text": "x", "label": 10**400}]
    resp = app_client.post("/v1/adapters", json={"name": "r", "task": "regression",
                                                 "training_data": rows})  # fmt: skip
    assert_problem(resp, 422, "row 9 field 'label': regression label must be a finite number")


def test_versions_beyond_the_integer_range_are_422(app_client):
    trained(app_client)
    big = 2**63
    for resp in (
        app_client.get(f"/v1/adapters/tickets/versions/{big}"),
        app_client.post(f"/v1/adapters/tickets/versions/{big}/promote"),
        app_client.get(f"/v1/adapters/tickets/download?version={big}"),
        predict(app_client, "tickets", TEXTS, version=big),
    ):
        assert_problem(resp, 422, "less than or equal to 2147483647")
    resp = app_client.post(f"/v2/models/tickets/versions/{big}/infer", json={"inputs": []})
    assert resp.status_code == 400, resp.text
    assert app_client.get("/v1/adapters/tickets/versions/2147483647").status_code == 404


def test_a_name_that_looks_like_an_id_is_refused(app_client):
    target = trained(app_client)
    rows = keyword_rows(5)
    resp = app_client.post("/v1/adapters", json={"name": target, "training_data": rows})
    assert_problem(resp, 422, "names starting with 'ad_' are reserved for adapter ids")
    resp = app_client.post("/v1/adapters", json={"name": "ad_other", "training_data": rows})
    assert_problem(resp, 422, "reserved")
    assert app_client.get(f"/v1/adapters/{target}").json()["name"] == "tickets"


@pytest.mark.parametrize(
    ("hyperparameters", "where"),
    [
        ({"class_weights": {"billing": -1e30}}, "finite, positive"),
        ('{"class_weights": {"billing": NaN}}', "finite, positive"),
        ({"class_weights": {"billing": 0}}, "finite, positive"),
        ('{"init_head_l2": Infinity}', "hyperparameters.init_head_l2: Input should be a finite"),
        ({"trainable_layers": []}, "an empty list trains no block"),
        ({"trainable_layers": -1}, "at least 1"),
        ({"trainable_layers": [0, -2]}, "block indices start at 0"),
        ({"trainable_layers": [0, 7]}, "trainable_layers: block 7 does not exist"),
        ({"trainable_layers": 3}, "trainable_layers: the base model has 2 blocks"),
        ({"class_weights": {"nope": 2.0}}, "class_weights: 'nope' is not a label"),
    ],
)
def test_invalid_hyperparameters_are_422_at_submission(app_client, hyperparameters, where):
    rows = json.dumps(keyword_rows(5))
    hp = hyperparameters if isinstance(hyperparameters, str) else json.dumps(hyperparameters)
    body = f'{{"name": "x", "training_data": {rows}, "hyperparameters": {hp}}}'
    resp = post_raw(app_client, "/v1/adapters", body)
    assert_problem(resp, 422, where)
    assert app_client.get("/v1/jobs").json()["jobs"] == []
