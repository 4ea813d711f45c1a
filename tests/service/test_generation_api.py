"""Generation through the API on a tiny random Llama: train from chats, answer through the
OpenAI-shaped routes, OpenAI-shaped errors, and the base/task rules."""

from __future__ import annotations

import json

import pytest

from loradock.service.settings import Settings
from tests.adapters.test_generation import ANSWER, sft_rows
from tests.conftest import started_client
from tests.service.test_tenancy import as_key, key_for
from tests.service.test_training_api import wait_job

FAST = {"learning_rate": 0.02, "batch_size": 4, "epochs": 6, "patience": 2}


@pytest.fixture
def llama_client(tmp_path, tiny_llama_dir, metrics):
    settings = Settings(data_dir=tmp_path / "data", base_model=tiny_llama_dir, dataset_workers=0,
                        max_seq_length=48)  # fmt: skip
    with started_client(settings, metrics) as client:
        yield client


def train(client, name="helpdesk", rows=None, **extra):
    body = {"name": name, "training_data": rows or sft_rows(), "hyperparameters": FAST, **extra}
    resp = client.post("/v1/adapters", json=body)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    return resp.json()["adapter"]["id"]


def openai_error(resp, status):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_generation_adapter_trains_and_answers_through_chat_completions(llama_client):
    c = llama_client
    adapter_id = train(c)
    adapter = c.get(f"/v1/adapters/{adapter_id}").json()
    assert adapter["task"] == "generation"  # the causal LM's default task
    version = adapter["versions"][0]
    assert version["metrics"]["val_loss"] < version["metrics"]["base_val_loss"]
    assert "reference_perplexity" in version["metrics"]
    assert adapter["live_version"] == 1

    question = {"role": "user", "content": "why refund is"}
    ask = {"model": "helpdesk", "messages": [question], "temperature": 0, "max_tokens": 8}
    resp = c.post("/v1/chat/completions", json=ask)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    base = c.post("/v1/chat/completions", json={
        "model": "base", "messages": [question], "temperature": 0, "max_tokens": 8})  # fmt: skip
    assert base.status_code == 200, base.text
    assert base.json()["choices"][0]["message"]["content"] != ANSWER

    ask = {"model": "helpdesk", "prompt": "the refund", "n": 2, "max_tokens": 4, "seed": 3}
    two = c.post("/v1/completions", json=ask)
    assert two.status_code == 200, two.text
    assert [ch["index"] for ch in two.json()["choices"]] == [0, 1]

    models = c.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]][1:] == ["helpdesk"]

    report = c.get("/v1/adapters/helpdesk/monitoring").json()
    forgetting = report["forgetting"]
    m = version["metrics"]
    assert forgetting["reference_perplexity"] == m["reference_perplexity"]
    rise = m["reference_perplexity"] / m["base_reference_perplexity"] - 1
    assert forgetting["rise"] == pytest.approx(rise, abs=1e-4)
    assert forgetting["verdict"] == ("forgetting" if rise > 0.2 else "ok")
    assert any("reference perplexity rose" in f for f in report["flags"]) == (rise > 0.2)
    exposition = c.get("/metrics").text
    assert f'loradock_adapter_reference_perplexity{{adapter="{adapter_id}"}}' in exposition


def test_generation_errors_are_openai_shaped_and_leave_the_server_serving(llama_client):
    c = llama_client
    train(c)
    error = openai_error(c.post("/v1/chat/completions", json={
        "model": "nobody", "messages": [{"role": "user", "content": "hi"}]}), 404)  # fmt: skip
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    error = openai_error(c.post("/v1/chat/completions", json={
        "model": "helpdesk", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 5}), 400)  # fmt: skip
    assert error["param"] == "temperature"
    error = openai_error(c.post("/v1/chat/completions", json={
        "model": "helpdesk", "messages": [{"role": "robot", "content": "hi"}]}), 400)  # fmt: skip
    assert "unknown role" in error["message"]
    error = openai_error(c.post("/v1/chat/completions", json={
        "model": "helpdesk", "messages": [{"role": "user", "content": "hi"}],
        "stop_token_ids": [10**6]}), 400)  # fmt: skip
    assert error["param"] == "stop_token_ids"
    error = openai_error(c.post("/v1/completions", json={"model": "helpdesk",
                                "prompt": "please " * 100, "max_tokens": 4}), 400)  # fmt: skip
    assert "context" in error["message"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"
    unauth = c.post("/v1/completions", json={"model": "base", "prompt": "x"},
                    headers={"Authorization": "Bearer nope"})  # fmt: skip
    openai_error(unauth, 401)
    ok = c.post("/v1/completions", json={"model": "helpdesk", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_another_tenants_generation_adapter_is_404(llama_client):
    c = llama_client
    train(c)
    other = c.post("/v1/tenants", json={"name": "other"}).json()["id"]
    outsider = as_key(c, key_for(c, other, ["predict"])["key"])
    error = openai_error(outsider.post("/v1/chat/completions", json={
        "model": "helpdesk", "messages": [{"role": "user", "content": "hi"}]}), 404)  # fmt: skip
    assert error["code"] == "model_not_found"
    assert [m["id"] for m in outsider.get("/v1/models").json()["data"]][1:] == []


def test_a_causal_lm_refuses_encoder_tasks_and_predict(llama_client):
    c = llama_client
    rows = [{"text": "a", "label": "b"}] * 4
    resp = c.post("/v1/adapters", json={"name": "cls", "task": "classification",
                                        "training_data": rows})  # fmt: skip
    assert resp.status_code == 422
    assert "causal language model" in resp.json()["detail"]
    resp = c.post("/v1/adapters", json={"name": "g", "training_data": sft_rows(8),
                                        "hyperparameters": {"serve": "probe"}})  # fmt: skip
    assert resp.status_code == 422
    assert "serve='base'" in resp.json()["detail"]
    train(c)
    resp = c.post("/v1/adapters/helpdesk/predict", json={"inputs": ["hi"]})
    assert resp.status_code == 422
    assert "/v1/chat/completions" in resp.json()["detail"]


def test_an_encoder_refuses_generation(app_client):
    resp = app_client.post("/v1/adapters", json={"name": "g", "task": "generation",
                                                 "training_data": sft_rows(8)})  # fmt: skip
    assert resp.status_code == 422
    assert "needs a causal language model" in resp.json()["detail"]
    error = openai_error(app_client.post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "hi"}]}), 400)  # fmt: skip
    assert "causal-LM" in error["message"]


def test_a_jsonl_upload_of_chats_trains(llama_client):
    c = llama_client
    data = "".join(json.dumps(r) + "\n" for r in sft_rows(16)).encode()
    resp = c.post("/v1/adapters", data={"name": "uploaded", "hyperparameters": json.dumps(FAST)},
                  files={"training_file": ("chats.jsonl", data)})  # fmt: skip
    assert resp.status_code == 202, resp.text
    assert resp.json()["adapter"]["task"] == "generation"
    job = wait_job(c, resp.json()["job"]["id"])
    assert job["status"] == "succeeded", job
