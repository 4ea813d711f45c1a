"""OpenAI's fine-tuning flow driven by the real `openai` client against the app (in-process, on
a tiny random Llama): files, jobs, events, checkpoints, the fine-tuned model answering."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest

from tests.adapters.test_generation import ANSWER, sft_rows
from tests.service.test_generation_api import llama_client  # noqa: F401 - a fixture
from tests.service.test_tenancy import as_key, key_for


def client_for(test_client, key=None):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key or test_client.admin_key,
                         http_client=test_client, max_retries=0)  # fmt: skip


def jsonl(rows):
    return io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())


def wait(client, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job)


def test_the_openai_fine_tuning_flow_end_to_end(llama_client):  # noqa: F811
    oa = client_for(llama_client)
    train = oa.files.create(file=("train.jsonl", jsonl(sft_rows(32))), purpose="fine-tune")
    assert train.purpose == "fine-tune"
    assert train.bytes > 0
    val = oa.files.create(file=("val.jsonl", jsonl(sft_rows(8)[::-1])), purpose="fine-tune")
    assert oa.files.retrieve(train.id).filename == "train.jsonl"
    assert {f.id for f in oa.files.list()} == {train.id, val.id}

    base = next(m.id for m in oa.models.list())
    job = oa.fine_tuning.jobs.create(
        model=base, training_file=train.id, validation_file=val.id, suffix="helpdesk", seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 20}}},
    )  # fmt: skip
    assert job.status in ("queued", "running")
    assert job.fine_tuned_model is None
    done = wait(oa, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft-helpdesk-")
    assert done.hyperparameters.n_epochs == 6
    assert done.trained_tokens > 0
    assert job.id in [j.id for j in oa.fine_tuning.jobs.list()]

    events = oa.fine_tuning.jobs.list_events(job.id).data
    assert events[0].message == "The job has successfully completed"  # newest first
    assert any(e.type == "metrics" for e in events)
    checkpoints = oa.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints
    steps = [c.step_number for c in checkpoints]
    assert steps == sorted(steps, reverse=True)
    metrics = checkpoints[0].metrics
    assert metrics.valid_loss is not None
    assert metrics.train_loss is not None
    assert 0 <= metrics.valid_mean_token_accuracy <= 1

    reply = oa.chat.completions.create(
        model=done.fine_tuned_model, temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": "why refund is"}],
    )  # fmt: skip
    assert reply.choices[0].message.content == ANSWER
    assert done.fine_tuned_model in [m.id for m in oa.models.list()]

    oa.files.delete(val.id)
    with pytest.raises(openai.NotFoundError):
        oa.files.retrieve(val.id)


def test_bad_files_and_jobs_are_openai_errors(llama_client):  # noqa: F811
    oa = client_for(llama_client)
    with pytest.raises(openai.BadRequestError, match="line 2"):
        oa.files.create(file=("t.jsonl", io.BytesIO(b'{"a": 1}\nnot json\n')), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        oa.files.create(file=("t.jsonl", jsonl(sft_rows(4))), purpose="assistants")
    bad = oa.files.create(file=("bad.jsonl", jsonl(
        [*sft_rows(6), {"messages": [{"role": "user", "content": "no answer"}]}])),
        purpose="fine-tune")  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="row 7") as e:
        oa.fine_tuning.jobs.create(model="base", training_file=bad.id)
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.NotFoundError):
        oa.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=bad.id)
    with pytest.raises(openai.NotFoundError):
        oa.fine_tuning.jobs.create(model="base", training_file="file-nope")
    with pytest.raises(openai.NotFoundError):
        oa.fine_tuning.jobs.retrieve("job_nope")


def test_files_and_jobs_belong_to_their_tenant(llama_client):  # noqa: F811
    oa = client_for(llama_client)
    f = oa.files.create(file=("t.jsonl", jsonl(sft_rows(12))), purpose="fine-tune")
    job = oa.fine_tuning.jobs.create(model="base", training_file=f.id,
                                     hyperparameters={"n_epochs": 1})  # fmt: skip
    other = llama_client.post("/v1/tenants", json={"name": "other"}).json()["id"]
    key = key_for(llama_client, other, ["train", "predict"])["key"]
    outsider = client_for(as_key(llama_client, key).client, key)
    for call in (
        lambda: outsider.files.retrieve(f.id),
        lambda: outsider.fine_tuning.jobs.retrieve(job.id),
        lambda: outsider.fine_tuning.jobs.cancel(job.id),
        lambda: outsider.fine_tuning.jobs.create(model="base", training_file=f.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert outsider.files.list().data == []
    assert outsider.fine_tuning.jobs.list().data == []
    cancelled = oa.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status in ("cancelled", "running", "succeeded")
