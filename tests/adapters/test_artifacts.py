import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load as st_load
from transformers import AutoModel

from loradock.adapters import tasks
from loradock.adapters.artifacts import files as artifacts
from loradock.adapters.artifacts.store import LocalStore
from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel
from loradock.adapters.tasks.probe import LinearHead
from tests.adapters.test_lora import random_weights

TEXTS = ["refund please", "my login password is not working", "late package", "thanks a lot"]
LABELS = ["billing", "login", "shipping"]


def meta(task="classification"):
    return {"task": task, "labels": LABELS if task == "classification" else [],
            "target_mean": 2.0, "target_std": 3.0}  # fmt: skip


def task_of(name="classification"):
    return tasks.from_meta(meta(name))


def head(out=3, hidden=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LinearHead(torch.randn(out, hidden, generator=g), torch.randn(out, generator=g))


@pytest.fixture
def base(tiny_bert_dir):
    return BaseModel.load(tiny_bert_dir, device="cpu")


def test_published_version_loads_and_predicts_the_same(base, tmp_path):
    weights = random_weights(base, 4, 8, ("query", "value"), None)
    lora.install(base.backbone, weights.names)
    files = artifacts.build_files(
        base=base, task=task_of(), meta={}, head=head(), weights=weights, profile_texts=TEXTS
    )
    assert set(files) == {
        "adapter_config.json", "adapter_model.safetensors", "head.safetensors",
        "loradock.json", "reference.json", "reference.safetensors",
    }  # fmt: skip
    store = LocalStore(tmp_path / "store")
    store.publish("t/a/v1", files)
    loaded = artifacts.load_adapter(store, "t/a/v1", base)
    direct = artifacts.AdapterModel(meta=meta(), task=task_of(), head=head(), weights=weights)
    got, want = loaded.predict(base, TEXTS), direct.predict(base, TEXTS)
    assert [p["label"] for p in got] == [p["label"] for p in want]
    for g, w in zip(got, want, strict=True):
        assert g["score"] == pytest.approx(w["score"], abs=1e-6)
        assert sum(g["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_peft_loads_the_adapter_outside_loradock(base, tiny_bert_dir, tmp_path):
    weights = random_weights(base, 4, 8, ("query", "key", "value"), (1,))
    lora.install(base.backbone, weights.names)
    files = artifacts.build_files(
        base=base, task=task_of(), meta={}, head=head(), weights=weights, profile_texts=[]
    )
    out = tmp_path / "peft"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert_dir), out).eval()
    batch = base.tokenize(TEXTS)
    with torch.inference_mode():
        theirs = model(**batch).last_hidden_state
        with lora.active(weights):
            ours = base.hidden_states(batch["input_ids"], batch["attention_mask"])
        plain = base.hidden_states(batch["input_ids"], batch["attention_mask"])
    assert (theirs - ours).abs().max().item() < 1e-4
    assert (theirs - plain).abs().max().item() > 1e-3


def test_head_only_version_has_no_peft_files(base, tmp_path):
    files = artifacts.build_files(
        base=base, task=task_of(), meta={}, head=head(), weights=None, profile_texts=TEXTS
    )
    assert "adapter_model.safetensors" not in files
    assert json.loads(files["loradock.json"])["has_lora"] is False
    store = LocalStore(tmp_path / "s")
    store.publish("t/a/v1", files)
    loaded = artifacts.load_adapter(store, "t/a/v1", base)
    assert loaded.weights is None
    assert len(loaded.predict(base, TEXTS)) == len(TEXTS)


def test_regression_predictions_are_in_label_units(base):
    h = head(out=1)
    model = artifacts.AdapterModel(
        meta=meta("regression"), task=task_of("regression"), head=h, weights=None
    )
    values = [p["value"] for p in model.predict(base, TEXTS)]
    raw = h(base.embed(TEXTS)).squeeze(-1)
    assert values == pytest.approx((raw * 3.0 + 2.0).tolist(), abs=1e-5)


def test_reference_profile_counts_every_row(base):
    texts = [f"refund {'very ' * (i % 7)}please" for i in range(40)]
    files = artifacts.build_files(
        base=base, task=task_of(), meta={}, head=head(), weights=None, profile_texts=texts
    )
    profile = json.loads(files["reference.json"])
    assert profile["rows"] == 40
    assert sum(profile["label_distribution"].values()) == 40
    assert sum(profile["confidence_histogram"]) == 40
    assert sum(profile["length_histogram"]) == 40
    assert len(profile["confidence_histogram"]) == len(profile["confidence_edges"]) + 1
    emb = st_load(files["reference.safetensors"])["embeddings"]
    assert emb.shape == (40, base.hidden_size)


def test_artifact_from_another_base_is_refused(base, tiny_llama_dir, tmp_path):
    store = LocalStore(tmp_path / "s")
    files = artifacts.build_files(
        base=base, task=task_of(), meta={}, head=head(), weights=None, profile_texts=[]
    )
    store.publish("t/a/v1", files)
    other = BaseModel.load(tiny_llama_dir, device="cpu")
    with pytest.raises(artifacts.ArtifactError, match="trained on base"):
        artifacts.load_adapter(store, "t/a/v1", other)
