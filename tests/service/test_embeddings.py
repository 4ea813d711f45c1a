"""POST /v1/embeddings: the OpenAI shape, from the frozen base or an adapter's LoRA encoder."""

import base64

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loradock.adapters.artifacts.files import load_adapter
from tests.service.test_app import assert_problem
from tests.service.test_predict_api import runtime_tenant, trained
from tests.service.test_tenancy import as_key, key_for

TEXTS = ["refund for my card charge", "login password error", "late package tracking"]


def embed(client, model, inputs, **extra):
    return client.post("/v1/embeddings", json={"model": model, "input": inputs, **extra})


def vectors(body):
    return torch.tensor([d["embedding"] for d in body["data"]])


def test_base_embeddings_are_the_frozen_base_normalized_in_order(app_client):
    resp = embed(app_client, "base", TEXTS)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    assert body["model"] == "base"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert {d["object"] for d in body["data"]} == {"embedding"}
    base = app_client.app.state.runtime.base
    expected = F.normalize(base.embed(TEXTS).float(), dim=1)
    got = vectors(body)
    assert got.shape == (3, base.hidden_size)
    assert torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-4)
    assert torch.allclose(got, expected, atol=2e-3)
    tokens = sum(len(ids) for ids in base.encode(TEXTS))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    one = embed(app_client, base.name, TEXTS[1]).json()  # a single string, the base's own name
    assert torch.allclose(vectors(one)[0], got[1], atol=1e-4)


def test_an_adapters_embeddings_come_from_its_lora_adapted_encoder(app_client):
    # the last epoch's weights (early stopping could restore epoch 0, where B = 0: no change)
    adapter_id = trained(app_client, hyperparameters={"serve": "lora", "learning_rate": 0.05,
                                                      "batch_size": 8, "epochs": 3,
                                                      "early_stopping": False})  # fmt: skip
    body = embed(app_client, "tickets", TEXTS).json()
    assert body["model"] == "tickets"
    runtime = app_client.app.state.runtime
    model = load_adapter(
        runtime.store, f"{runtime_tenant(app_client)}/{adapter_id}/v1", runtime.base
    )
    assert model.weights is not None
    _, pooled, _ = model.forward(runtime.base, TEXTS)
    expected = F.normalize(pooled.float(), dim=1)
    got = vectors(body)
    assert torch.allclose(got, expected, atol=2e-3)
    base = vectors(embed(app_client, "base", TEXTS).json())
    assert (got - base).abs().max() > 2e-2  # LoRA changed the encoder, far beyond the tolerance
    # by id too, and base64 decodes to the same floats
    b64 = embed(app_client, adapter_id, TEXTS, encoding_format="base64").json()
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]]
    )
    assert np.allclose(decoded, got.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"model": "base", "input": []}, "empty"),
        ({"model": "base", "input": [[1, 2, 3]]}, "input"),
        ({"model": "base", "input": "x", "dimensions": 8}, "dimensions"),
        ({"model": "base", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "base", "input": "x", "extra": 1}, "extra"),
        ({"model": "base", "input": [""]}, "empty"),
    ],
)
def test_bad_requests_are_422_and_say_why(app_client, body, detail):
    resp = app_client.post("/v1/embeddings", json=body)
    assert_problem(resp, 422, detail)


def test_unknown_and_other_tenants_adapters_are_404(app_client):
    trained(app_client)
    assert_problem(embed(app_client, "nope", "x"), 404)
    other = app_client.post("/v1/tenants", json={"name": "other"}).json()["id"]
    outsider = as_key(app_client, key_for(app_client, other, ["predict"])["key"])
    assert_problem(embed(outsider, "tickets", "x"), 404)
    assert embed(outsider, "base", "x").status_code == 200  # the shared base is everyone's
