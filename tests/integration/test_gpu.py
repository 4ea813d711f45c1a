"""The accelerator path through a real server: the base model on CUDA in its half-precision
default, adapters trained there and served in mixed batches, and a causal LM answering the real
`openai` client.

Marked `gpu`: skipped where torch sees no CUDA device. `bench/gpu.sh` runs them on a GPU machine;
`bench/gpu.sh --dry-run` runs them on the CPU (LORADOCK_TEST_DEVICE=cpu) to show they would run.
Models: LORADOCK_TEST_ENCODER / LORADOCK_TEST_CAUSAL_LM (a model folder or preset name), by default
the embedded defaults."""

import os
import threading

import httpx
import openai
import pytest

from loradock.adapters.core.device import resolve_device, resolve_dtype
from tests.datasets import keyword_rows
from tests.integration.test_jobs_restart import wait_for
from tests.server import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.gpu(dry_run=True), pytest.mark.slow]

DEVICE = os.environ.get("LORADOCK_TEST_DEVICE", "cuda")
ENCODER = os.environ.get("LORADOCK_TEST_ENCODER")  # None: the embedded default encoder
CAUSAL_LM = os.environ.get("LORADOCK_TEST_CAUSAL_LM", "smollm2-135m-instruct")
# LoRA served even where the probe validates as well: the point is adapters mixed in one pass
FAST = {"epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "serve": "lora"}
TEXTS = ["refund for my card charge", "login password error", "late package tracking"]


def expected_dtype(kind: str) -> str:
    return str(resolve_dtype("auto", resolve_device(DEVICE), kind)).removeprefix("torch.")


def test_encoder_trains_and_serves_mixed_adapters_on_the_device(tmp_path):
    extra = {"base_model": ENCODER} if ENCODER else {}
    with ServerProcess(tmp_path / "d", device=DEVICE, **extra) as server:
        model = httpx.get(server.url + "/readyz").json()["base_model"]
        assert model["device"].startswith(DEVICE)
        assert model["dtype"] == expected_dtype("encoder")
        with server.client() as c:
            jobs = []
            for name, seed in (("tickets", 0), ("orders", 1)):
                body = {"name": name, "training_data": keyword_rows(16, seed=seed),
                        "hyperparameters": FAST}  # fmt: skip
                resp = c.post("/v1/adapters", json=body)
                assert resp.status_code == 202, resp.text
                jobs.append(resp.json()["job"]["id"])
            for job_id in jobs:
                job = wait_for(c, job_id, lambda j: j["status"] not in ("queued", "running"),
                               timeout=600)  # fmt: skip
                assert job["status"] == "succeeded", job
            alone = {
                name: c.post(f"/v1/adapters/{name}/predict", json={"inputs": TEXTS}).json()
                for name in ("tickets", "orders")
            }
            for name, body in alone.items():
                labels = [p["label"] for p in body["predictions"]]
                assert labels == ["billing", "login", "shipping"], (name, body)

        # Both adapters at once, from many threads: the engine mixes them in one forward pass and
        # every answer equals the one each request got alone.
        results: list[tuple[str, dict]] = []
        failures: list[BaseException] = []

        def ask(name: str) -> None:
            try:
                with server.client() as c:
                    for _ in range(5):
                        resp = c.post(f"/v1/adapters/{name}/predict", json={"inputs": TEXTS})
                        results.append((name, resp.json()))
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=ask, args=(n,)) for n in ("tickets", "orders") * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures
        assert len(results) == 40
        for name, body in results:
            got = [p["label"] for p in body["predictions"]]
            want = [p["label"] for p in alone[name]["predictions"]]
            assert got == want
            for g, w in zip(body["predictions"], alone[name]["predictions"], strict=True):
                assert g["score"] == pytest.approx(w["score"], abs=2e-2)  # bf16 batch shapes
        metrics = httpx.get(server.url + "/metrics").text
        assert "loradock_base_model_info{" in metrics
        assert f'device="{model["device"]}"' in metrics


def test_causal_lm_answers_the_openai_client_on_the_device(tmp_path):
    with ServerProcess(tmp_path / "d", device=DEVICE, base_model=CAUSAL_LM,
                       max_seq_length=256) as server:  # fmt: skip
        model = httpx.get(server.url + "/readyz").json()["base_model"]
        assert model["kind"] == "causal_lm"
        assert model["device"].startswith(DEVICE)
        assert model["dtype"] == expected_dtype("causal_lm")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.admin_key)
        name = client.models.list().data[0].id
        ask = [{"role": "user", "content": "Count from one to five."}]
        once = client.chat.completions.create(model=name, messages=ask, temperature=0,
                                              max_tokens=16)  # fmt: skip
        assert once.usage.completion_tokens > 0
        streamed = client.chat.completions.create(model=name, messages=ask, temperature=0,
                                                  max_tokens=16, stream=True)  # fmt: skip
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed)
        assert text == once.choices[0].message.content
        # 8 requests at once decode in one batch; each equals the same request alone (greedy)
        outs: list[str] = []

        def one() -> None:
            r = client.chat.completions.create(model=name, messages=ask, temperature=0,
                                               max_tokens=16)  # fmt: skip
            outs.append(r.choices[0].message.content)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        want = once.choices[0].message.content
        assert len(outs) == 8
        assert all(outs)
        if model["dtype"] == "float32":
            assert outs == [want] * 8
        else:  # half-precision kernels may pick other tile shapes for other batch sizes
            assert all(o[:8] == want[:8] for o in outs), (outs, want)
