"""Streaming generation through the OpenAI routes (in process, tiny random Llama): OpenAI's chunk
format, stream == non-stream, `n`, usage, logprobs, the real `openai` client, shedding at the door.
"""

from __future__ import annotations

import json
import math
import threading
import time

import openai
import pytest

from loradock.adapters.serving.decode import Sequence
from loradock.adapters.serving.generation import SamplingParams
from tests.adapters.test_generation import ANSWER, QUESTIONS
from tests.service.test_finetuning_api import client_for
from tests.service.test_generation_api import llama_client, train  # noqa: F401 - a fixture

ASK = {"model": "helpdesk", "messages": [{"role": "user", "content": "why refund is"}],
       "temperature": 0, "max_tokens": 8}  # fmt: skip


def sse(resp) -> list[object]:
    """The data payloads of an event stream, in order ([DONE] as the string)."""
    assert resp.status_code == 200, resp.read()
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in resp.read().decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_stream_is_openais_chunk_format_and_equals_the_whole_answer(llama_client):  # noqa: F811
    c = llama_client
    train(c)
    whole = c.post("/v1/chat/completions", json=ASK).json()
    body = {**ASK, "stream": True, "n": 2, "stream_options": {"include_usage": True}}
    with c.stream("POST", "/v1/chat/completions", json=body) as resp:
        events = sse(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {e["object"] for e in chunks} == {"chat.completion.chunk"}
    assert len({e["id"] for e in chunks}) == 1
    usage = chunks[-1]
    assert usage["choices"] == []
    for index in (0, 1):
        mine = [e["choices"][0] for e in chunks[:-1] if e["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert all(m["finish_reason"] is None for m in mine[:-1])
        text = "".join(m["delta"].get("content", "") for m in mine)
        assert text == whole["choices"][0]["message"]["content"] == ANSWER  # greedy: the same
    assert all(e["usage"] is None for e in chunks[:-1])
    assert usage["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert usage["usage"]["completion_tokens"] == 2 * whole["usage"]["completion_tokens"]
    exposition = c.get("/metrics").text
    assert "loradock_generation_time_to_first_token_seconds_count" in exposition
    assert "loradock_generation_running_sequences 0.0" in exposition


def test_completions_stream_and_logprobs(llama_client):  # noqa: F811
    c = llama_client
    train(c)
    ask = {"model": "base", "prompt": "the refund", "temperature": 0, "max_tokens": 6,
           "logprobs": 2}  # fmt: skip
    whole = c.post("/v1/completions", json=ask).json()
    choice = whole["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == whole["usage"]["completion_tokens"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                   strict=True):  # fmt: skip
        assert logprob <= 0
        assert len(top) <= 2
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy takes the top one
        assert token in top
    with c.stream("POST", "/v1/completions", json={**ask, "stream": True}) as resp:
        events = sse(resp)
    pieces = [e["choices"][0] for e in events[:-1]]
    assert {e["object"] for e in events[:-1]} == {"text_completion"}
    assert "".join(p["text"] for p in pieces) == choice["text"]
    streamed = [t for p in pieces if p["logprobs"] for t in p["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-5)
    chat = c.post("/v1/chat/completions", json={**ASK, "logprobs": True, "top_logprobs": 1})
    content = chat.json()["choices"][0]["logprobs"]["content"]
    assert all(math.isfinite(t["logprob"]) and len(t["top_logprobs"]) == 1 for t in content)
    assert "".join(t["token"] for t in content).replace(" ", "") == ANSWER.replace(" ", "")


def test_the_openai_client_streams(llama_client):  # noqa: F811
    train(llama_client)
    oa = client_for(llama_client)
    stream = oa.chat.completions.create(stream=True, **ASK)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == oa.chat.completions.create(**ASK).choices[0].message.content == ANSWER
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(stream=True, **{**ASK, "model": "nobody"})


def test_a_full_generation_queue_is_shed_at_the_door(tmp_path, tiny_llama_dir, metrics):
    from loradock.service.settings import Settings
    from tests.conftest import started_client

    settings = Settings(data_dir=tmp_path / "data", base_model=tiny_llama_dir, dataset_workers=0,
                        generation_max_running=1, max_waiting_generations=1)  # fmt: skip
    with started_client(settings, metrics) as c:
        runtime = c.app.state.runtime
        for _ in range(500):  # the data plane is built just after the base loads
            if runtime.serving is not None:
                break
            time.sleep(0.01)
        engine = runtime.serving.generator
        gate = threading.Event()

        def stuck(event):  # holds the engine thread until the test lets go
            gate.wait(30)

        ids = engine.base.tokenizer("please help")["input_ids"]
        blocker = Sequence(ids, SamplingParams(max_tokens=2, temperature=0), sink=stuck)
        queued = Sequence(ids, SamplingParams(max_tokens=2, temperature=0), sink=lambda e: None)
        try:
            engine.prepare(blocker)
            engine.submit([blocker])
            while engine.running() == 0 and engine.waiting() > 0:
                pass  # the engine thread takes it (and blocks in its sink)
            engine.prepare(queued)
            engine.submit([queued])  # the one waiting place is taken
            resp = c.post("/v1/completions", json={"model": "base", "prompt": "hi"})
            assert resp.status_code == 429, resp.text
            assert resp.headers["retry-after"] == "1"
            assert "LORADOCK_MAX_WAITING_GENERATIONS" in resp.json()["error"]["message"]
        finally:
            gate.set()
        while engine.waiting():  # the queued one gets its place as soon as the engine moves
            time.sleep(0.01)
        ok = c.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_generation_traffic_is_monitored_for_drift(llama_client):  # noqa: F811
    c = llama_client
    s = c.app.state.runtime.settings
    s.drift_min_count, s.drift_check_every = 24, 24
    adapter_id = train(c)
    report = c.get("/v1/adapters/helpdesk/monitoring").json()
    assert report["drift"]["status"] == "no traffic yet"
    for i in range(24):  # prompts like the training ones
        ask = {**ASK, "messages": [{"role": "user", "content": f"{QUESTIONS[i % 8]} is why"}]}
        assert c.post("/v1/chat/completions", json=ask).status_code == 200
    c.app.state.runtime.monitor.drain()
    drift = c.get("/v1/adapters/helpdesk/monitoring").json()["drift"]
    assert drift["status"] == "scored", drift
    assert set(drift["signals"]) == {"input_length", "output_length", "embedding"}
    assert drift["signals"]["input_length"]["psi"] < 0.2
    # Long prompts of other words, with 20-token answers: lengths and embeddings move.
    other = " ".join(["package slow card late crash"] * 8)
    for _ in range(48):
        ask = {**ASK, "messages": [{"role": "user", "content": other}], "max_tokens": 20,
               "ignore_eos": True}  # fmt: skip
        assert c.post("/v1/chat/completions", json=ask).status_code == 200
    c.app.state.runtime.monitor.drain()
    drift = c.get("/v1/adapters/helpdesk/monitoring").json()["drift"]
    assert drift["drifting"] is True
    assert {"input_length", "output_length"} <= set(drift["drifted_signals"])
    assert drift["signals"]["embedding"]["p_value"] < 0.05
    assert f'loradock_adapter_drifting{{adapter="{adapter_id}"}} 1.0' in c.get("/metrics").text
