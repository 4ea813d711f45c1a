"""Exports load in the tools users have: plain peft + transformers, and sentence-transformers,
reproduce loradock's own outputs for LoRA versions, head-only (probe) versions, regression and
multi-label heads."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from loradock.adapters import tasks
from loradock.adapters.artifacts.export import ExportError, export_files
from loradock.adapters.artifacts.files import AdapterModel
from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel
from tests.adapters.test_artifacts import LABELS, TEXTS, head, task_of
from tests.adapters.test_lora import random_weights


@pytest.fixture
def base(tiny_bert_dir):
    return BaseModel.load(tiny_bert_dir, device="cpu", dtype="float32")


def lora_model(base, task=None, out=3):
    weights = random_weights(base, 4, 8, ("query", "value"), None)
    with torch.no_grad():  # B = 0 would make LoRA a no-op: give it weight
        for b in weights.B:
            b.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    lora.install(base.backbone, weights.names)
    meta = {"version": 3, "winner": "lora", "metrics": {"val_macro_f1": 0.8},
            "baseline": {"val_macro_f1": 0.7}, "hyperparameters": {"rank": 4}}  # fmt: skip
    return AdapterModel(meta=meta, task=task or task_of(), head=head(out=out), weights=weights)


def write(files, folder):
    folder.mkdir()
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def outputs_of(model, base):
    outputs, pooled, _ = model.forward(base, TEXTS)
    return outputs, pooled


def peft_outputs(folder, base_dir, has_lora):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModel.from_pretrained(base_dir)
    if has_lora:
        model = PeftModel.from_pretrained(model, folder)
    model.eval()
    h = load_file(str(folder / "head.safetensors"))
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return pooled @ h["weight"].T + h["bias"]


def test_a_peft_export_loads_with_plain_peft_and_reproduces_predictions(base, tiny_bert_dir,
                                                                         tmp_path):  # fmt: skip
    model = lora_model(base)
    files = export_files(model, base, "peft", base_model_id="org/tiny-bert", name="tickets")
    config = json.loads(files["adapter_config.json"])
    assert config["task_type"] == "FEATURE_EXTRACTION"
    assert config["base_model_name_or_path"] == "org/tiny-bert"
    assert json.loads(files["loradock.json"])["version"] == 3
    head_config = json.loads(files["head_config.json"])
    assert head_config["outputs"] == LABELS
    assert head_config["activation"] == "softmax"
    assert head_config["base_fingerprint"] == base.fingerprint
    card = files["README.md"].decode()
    assert "base_model: org/tiny-bert" in card
    assert "library_name: peft" in card
    assert "| macro_f1 | 0.8000 | 0.7000 |" in card
    folder = write(files, tmp_path / "peft")
    theirs = peft_outputs(folder, tiny_bert_dir, has_lora=True)
    ours, _ = outputs_of(model, base)
    assert torch.allclose(theirs, ours, atol=1e-4)
    plain = peft_outputs(folder, tiny_bert_dir, has_lora=False)
    assert not torch.allclose(plain, ours, atol=1e-3)  # the LoRA weights really matter
    want = [p["scores"] for p in model.predict(base, TEXTS)]
    got = theirs.softmax(-1)
    for row, scores in zip(got, want, strict=True):
        assert row.tolist() == pytest.approx([scores[x] for x in LABELS], abs=1e-4)


def test_a_sentence_transformers_export_reproduces_predictions(base, tmp_path):
    model = lora_model(base)
    files = export_files(model, base, "sentence-transformers", base_model_id="org/tiny-bert",
                         name="tickets")  # fmt: skip
    folder = write(files, tmp_path / "st")
    st = SentenceTransformer(str(folder), device="cpu")
    theirs = st.encode(TEXTS, convert_to_tensor=True)
    ours, pooled = outputs_of(model, base)
    assert torch.allclose(theirs, ours, atol=1e-4)
    # without its head module, it is the LoRA-adapted encoder
    encoder = SentenceTransformer(modules=[st[0], st[1]], device="cpu")
    assert torch.allclose(encoder.encode(TEXTS, convert_to_tensor=True), pooled, atol=1e-4)


def test_a_probe_version_exports_head_only_and_says_so(base, tiny_bert_dir, tmp_path):
    model = AdapterModel(meta={"version": 1, "winner": "probe"}, task=task_of(), head=head(),
                         weights=None)  # fmt: skip
    files = export_files(model, base, "peft", base_model_id="org/tiny-bert", name="tickets")
    assert "adapter_model.safetensors" not in files
    assert "adapter_config.json" not in files
    assert "head-only" in files["README.md"].decode()
    assert json.loads(files["head_config.json"])["has_lora"] is False
    folder = write(files, tmp_path / "probe")
    ours, _ = outputs_of(model, base)
    assert torch.allclose(peft_outputs(folder, tiny_bert_dir, has_lora=False), ours, atol=1e-4)
    st_files = export_files(model, base, "sentence-transformers", base_model_id="x", name="t")
    st = SentenceTransformer(str(write(st_files, tmp_path / "probe-st")), device="cpu")
    assert torch.allclose(st.encode(TEXTS, convert_to_tensor=True), ours, atol=1e-4)


def test_regression_exports_values_in_label_units(base, tmp_path):
    task = tasks.from_meta({"task": "regression", "target_mean": 50.0, "target_std": 10.0})
    model = lora_model(base, task=task, out=1)
    files = export_files(model, base, "sentence-transformers", base_model_id="x", name="price")
    st = SentenceTransformer(str(write(files, tmp_path / "reg")), device="cpu")
    values = st.encode(TEXTS, convert_to_tensor=True)[:, 0]
    want = [p["value"] for p in model.predict(base, TEXTS)]
    assert values.tolist() == pytest.approx(want, abs=1e-3)


def test_multilabel_exports_carry_their_thresholds(base):
    task = tasks.from_meta({"task": "multilabel", "labels": ["a", "b"], "thresholds": [0.3, 0.7]})
    model = lora_model(base, task=task, out=2)
    files = export_files(model, base, "peft", base_model_id="x", name="tags")
    config = json.loads(files["head_config.json"])
    assert config["activation"] == "sigmoid"
    assert config["thresholds"] == {"a": 0.3, "b": 0.7}


def test_unknown_formats_and_unmergeable_bases_are_clear_errors(base, tmp_path):
    model = lora_model(base)
    with pytest.raises(ExportError, match="unknown export format"):
        export_files(model, base, "onnx", base_model_id="x", name="t")
    base.path = tmp_path  # a base without a single model.safetensors
    with pytest.raises(ExportError, match=r"one model\.safetensors"):
        export_files(model, base, "sentence-transformers", base_model_id="x", name="t")
