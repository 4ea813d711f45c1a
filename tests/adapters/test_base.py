import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loradock.adapters.core.base import BaseModel, BaseModelError, check_model_dir

# One table drives every architecture through the same checks (encoder and decoder-only).
CASES = {
    "bert": {
        "fixture": "tiny_bert_dir",
        "decoder": False,
        "targets": ["query", "key", "value"],
        "shape": ("encoder.layer.1.attention.self.query", 32, 32),
    },
    "llama": {
        "fixture": "tiny_llama_dir",
        "decoder": True,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        # 2 KV heads of 8 dims: grouped-query attention makes k_proj narrower than q_proj.
        "shape": ("layers.0.self_attn.k_proj", 32, 16),
    },
}
TEXTS = ["refund please", "my login password is not working and the app will crash", "hello"]


@pytest.fixture(params=list(CASES))
def case(request):
    spec = CASES[request.param]
    base = BaseModel.load(request.getfixturevalue(spec["fixture"]), device="cpu")
    return spec, base


def test_loaded_frozen_and_in_eval_mode(case):
    _, base = case
    assert not any(p.requires_grad for p in base.backbone.parameters())
    assert not any(m.training for m in base.backbone.modules())
    assert base.device == torch.device("cpu")
    assert base.dtype is torch.float32


def test_describes_architecture(case):
    spec, base = case
    assert base.is_decoder is spec["decoder"]
    facts = base.describe()
    assert facts["hidden_size"] == 32
    assert facts["num_layers"] == 2
    whole = base.lm if base.lm is not None else base.backbone  # a causal LM counts its LM head
    assert facts["parameters"] == sum(p.numel() for p in whole.parameters())
    assert facts["kind"] == ("causal_lm" if spec["decoder"] else "encoder")


def test_embed_shape_dtype_and_order(case):
    _, base = case
    pooled = base.embed(TEXTS)
    assert pooled.shape == (len(TEXTS), base.hidden_size)
    assert pooled.dtype is torch.float32
    # embed sorts by length internally; each row must still belong to its own text.
    for i, text in enumerate(TEXTS):
        alone = base.embed([text])
        torch.testing.assert_close(pooled[i], alone[0], atol=1e-5, rtol=1e-5)


def test_padding_is_masked_out_of_the_pool(case):
    _, base = case
    short = "hello"
    batch = base.tokenize([short, TEXTS[1]])
    assert int(batch["attention_mask"][0].sum()) < batch["attention_mask"].shape[1]  # was padded
    hidden = base.hidden_states(batch["input_ids"], batch["attention_mask"])
    pooled = base.mean_pool(hidden, batch["attention_mask"])
    single = base.tokenize([short])
    expected = base.hidden_states(single["input_ids"], single["attention_mask"]).mean(dim=1)
    torch.testing.assert_close(pooled[0], expected[0], atol=1e-5, rtol=1e-5)


def test_long_texts_are_truncated_to_max_length(case):
    _, base = case
    batch = base.tokenize(["refund " * 500])
    assert batch["input_ids"].shape[1] == base.max_length
    assert base.max_length == 64  # capped by the tiny model's max_position_embeddings


def test_linear_targets_report_shapes_and_layers(case):
    spec, base = case
    targets = {t.name: t for t in base.linear_targets()}
    name, d_in, d_out = spec["shape"]
    assert (targets[name].in_features, targets[name].out_features) == (d_in, d_out)
    assert {t.layer for t in targets.values() if t.layer is not None} == {0, 1}
    assert base.default_target_modules() == spec["targets"]


def test_default_targets_are_what_peft_wraps(case):
    spec, base = case
    model = BaseModel.load(base.path, device="cpu").backbone  # peft mutates; use a fresh copy
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=base.default_target_modules())
    )
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == base.num_layers * len(spec["targets"])


def test_decoder_without_pad_token_gets_one(tiny_llama_dir):
    base = BaseModel.load(tiny_llama_dir, device="cpu")
    assert base.tokenizer.pad_token == "</s>"


def test_bfloat16_placement(tiny_bert_dir):
    base = BaseModel.load(tiny_bert_dir, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in base.backbone.parameters()} == {torch.bfloat16}
    assert base.embed(["hello"]).dtype is torch.float32  # pooled output stays fp32 for the heads


def test_deterministic_embeddings(tiny_bert_dir):
    a = BaseModel.load(tiny_bert_dir, device="cpu").embed(TEXTS)
    b = BaseModel.load(tiny_bert_dir, device="cpu").embed(TEXTS)
    assert torch.equal(a, b)


def test_fingerprint_changes_with_the_model(tiny_bert_dir, tiny_llama_dir):
    bert = BaseModel.load(tiny_bert_dir, device="cpu")
    assert bert.fingerprint == BaseModel.load(tiny_bert_dir, device="cpu").fingerprint
    assert bert.fingerprint != BaseModel.load(tiny_llama_dir, device="cpu").fingerprint


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "is not a directory"),
        (lambda d: d, "has no config.json"),
        (lambda d: (d / "config.json").write_text("{}") and d, "has no weight file"),
    ],
)
def test_check_model_dir_names_path_and_expectation(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(BaseModelError) as info:
        check_model_dir(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "config.json" in message  # says what a model directory must contain


def test_unloadable_weights_raise_base_model_error(tmp_path, tiny_bert_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BaseModelError, match="could not load base model"):
        BaseModel.load(broken, device="cpu")


def test_unknown_architecture_config_is_a_clear_error(tmp_path, tiny_bert_dir):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_bert_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match=str(odd)):
        BaseModel.load(odd, device="cpu")


def test_warm_up_leaves_the_base_frozen_and_unchanged(tiny_bert_dir):
    base = BaseModel.load(tiny_bert_dir, device="cpu")
    before = {k: v.clone() for k, v in base.backbone.state_dict().items()}
    embedded = base.embed(TEXTS)
    base.warm_up()
    assert not base.backbone.training
    assert not any(p.requires_grad for p in base.backbone.parameters())
    after = base.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(base.embed(TEXTS), embedded)  # no state carried over


@pytest.mark.gpu
def test_cuda_placement_matches_cpu(tiny_bert_dir):
    cpu = BaseModel.load(tiny_bert_dir, device="cpu")
    gpu = BaseModel.load(tiny_bert_dir, device="auto", dtype="float32")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.embed(TEXTS).cpu(), cpu.embed(TEXTS), atol=1e-4, rtol=1e-4)
    half = BaseModel.load(tiny_bert_dir, device="auto")
    assert half.dtype in (torch.bfloat16, torch.float16)
    torch.testing.assert_close(half.embed(TEXTS).cpu(), cpu.embed(TEXTS), atol=5e-2, rtol=5e-2)


def test_bf16_training_attention_on_cpu_runs_in_float32_and_matches(tiny_llama_dir, monkeypatch):
    """Autocast training's attention is computed in float32 on the CPU (its bf16 backward is
    slow there); inference keeps bf16 in, and both keep transformers' padding masks."""
    import transformers.integrations.sdpa_attention as sdpa

    from loradock.adapters.core.base import TRAINING_SDPA

    base = BaseModel.load(tiny_llama_dir, device="cpu")
    assert base.lm.config._attn_implementation == TRAINING_SDPA
    seen: list[tuple[torch.dtype, bool]] = []  # (query dtype, autocast on) inside the call
    real = sdpa.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", spy)
    batch = base.pad([[5, 6, 7, 8, 9], [5, 6, 7]])
    emb = base.lm.get_input_embeddings()
    x = emb(batch["input_ids"]).detach().requires_grad_(True)  # grads flow into attention

    def hidden(autocast: bool, grad: bool):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return base.backbone(inputs_embeds=x, attention_mask=batch["attention_mask"])[0]

    fp32 = hidden(False, False)
    seen.clear()
    trained = hidden(True, True)
    assert set(seen) == {(torch.float32, False)}
    trained.float().sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    seen.clear()
    served = hidden(True, False)
    assert {on for _, on in seen} == {True}  # autocast runs it in bf16, as before
    mask = batch["attention_mask"].bool()
    for got in (trained, served):  # bf16 matmuls: close to float32 on the real tokens
        torch.testing.assert_close(got.float()[mask], fp32[mask], rtol=0.05, atol=0.05)
    # the second row's padding is masked: its real tokens match the row alone
    alone = base.backbone(
        inputs_embeds=x[1:, :3].detach(), attention_mask=batch["attention_mask"][1:, :3]
    )[0]
    torch.testing.assert_close(fp32[1, :3], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_a_bf16_base_trains_through_float32_attention(request, fixture):
    """A bf16 base (no autocast) whose activations need gradients: attention computed in
    float32 and handed back in bf16, so the next bf16 layer accepts it."""
    base = BaseModel.load(request.getfixturevalue(fixture), device="cpu", dtype="bfloat16")
    batch = base.pad([[5, 6, 7, 8, 9], [5, 6, 7]])
    x = base.backbone.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = base.backbone(inputs_embeds=x, attention_mask=batch["attention_mask"])[0]
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
