import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel

TEXTS = ["refund please", "my login password is not working", "late package tracking help"]

# rank, alpha, target suffixes, layers (None = all): several shapes of adapter against peft.
CASES = [
    ("tiny_bert_dir", 4, 8, ("query", "value"), None),
    ("tiny_bert_dir", 8, 16, ("query", "key", "value"), (1,)),
    ("tiny_bert_dir", 2, 32, ("dense",), None),  # attention output, intermediate and output dense
    ("tiny_llama_dir", 4, 4, ("q_proj", "k_proj", "v_proj", "o_proj"), None),
    ("tiny_llama_dir", 8, 16, ("gate_proj", "down_proj"), (0,)),
]


def random_weights(base, rank, alpha, targets, layers, seed=0):
    spec = lora.LoRASpec(rank, alpha, 0.0, targets, layers)
    linear = [t.name for t in base.linear_targets()]
    names = lora.select_targets(linear, targets, layers)
    shapes = {
        t.name: (t.in_features, t.out_features) for t in base.linear_targets() if t.name in names
    }
    g = torch.Generator().manual_seed(seed)
    w = lora.LoRAWeights(spec, shapes, generator=g)
    with torch.no_grad():
        for b in w.B:  # non-zero B, or the delta would be trivially zero
            b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return w


def hidden(base, weights=None):
    batch = base.tokenize(TEXTS)
    with torch.inference_mode(), lora.active(weights):
        return base.hidden_states(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize(("fixture", "rank", "alpha", "targets", "layers"), CASES)
def test_matches_peft(request, fixture, rank, alpha, targets, layers):
    path = request.getfixturevalue(fixture)
    ours = BaseModel.load(path, device="cpu")
    weights = random_weights(ours, rank, alpha, targets, layers)
    lora.install(ours.backbone, weights.names)
    mine = hidden(ours, weights)

    reference = BaseModel.load(path, device="cpu")
    exported = weights.peft_config(str(path))
    config = LoraConfig(
        r=exported["r"],
        lora_alpha=exported["lora_alpha"],
        lora_dropout=0.0,
        target_modules=exported["target_modules"],
    )
    peft_model = get_peft_model(reference.backbone, config)
    result = set_peft_model_state_dict(peft_model, weights.peft_state_dict())
    assert not [k for k in result.unexpected_keys if "lora" in k]
    peft_model.eval()
    batch = reference.tokenize(TEXTS)
    with torch.inference_mode():
        theirs = peft_model(**batch).last_hidden_state

    assert (mine - theirs).abs().max().item() < 1e-4
    assert (mine - hidden(BaseModel.load(path, device="cpu"))).abs().max().item() > 1e-3


def test_installed_wrappers_change_nothing_without_a_context(tiny_bert_dir):
    base = BaseModel.load(tiny_bert_dir, device="cpu")
    before = hidden(base)
    names = [t.name for t in base.linear_targets()]
    assert lora.install(base.backbone, names) == names
    assert lora.install(base.backbone, names) == []  # idempotent
    assert torch.equal(hidden(base), before)
    assert sorted(lora.wrapped_names(base.backbone)) == sorted(names)
    # linear_targets still reports the wrapped layers by their own names and shapes
    assert [t.name for t in base.linear_targets()] == names


def test_contexts_are_per_thread(tiny_bert_dir):
    """A training thread's adapter never leaks into a serving thread's forward pass."""
    base = BaseModel.load(tiny_bert_dir, device="cpu")
    weights = random_weights(base, 4, 8, ("query", "value"), None)
    lora.install(base.backbone, weights.names)
    plain = hidden(base)
    adapted = hidden(base, weights)
    assert not torch.allclose(plain, adapted)

    stop = threading.Event()
    seen_in_thread = []

    def adapter_thread():
        with lora.active(weights):
            while not stop.is_set():
                batch = base.tokenize(TEXTS)
                with torch.inference_mode():
                    out = base.hidden_states(batch["input_ids"], batch["attention_mask"])
                seen_in_thread.append(torch.equal(out, adapted))

    t = threading.Thread(target=adapter_thread)
    t.start()
    try:
        for _ in range(20):
            assert torch.equal(hidden(base), plain)
    finally:
        stop.set()
        t.join()
    assert seen_in_thread
    assert all(seen_in_thread)


def test_peft_round_trip(tiny_bert_dir):
    base = BaseModel.load(tiny_bert_dir, device="cpu")
    weights = random_weights(base, 4, 8, ("query",), (0, 1))
    rebuilt = lora.LoRAWeights.from_peft(weights.spec, weights.peft_state_dict())
    assert rebuilt.names == weights.names
    for a, b in zip(rebuilt.parameters(), weights.parameters(), strict=True):
        assert torch.equal(a, b)
    config = weights.peft_config("/some/base")
    assert config["r"] == 4
    assert config["lora_alpha"] == 8
    assert config["target_modules"] == weights.names
    assert all(".layer.0." in n or ".layer.1." in n for n in config["target_modules"])


def test_rank_mismatch_is_refused(tiny_bert_dir):
    base = BaseModel.load(tiny_bert_dir, device="cpu")
    weights = random_weights(base, 4, 8, ("query",), None)
    wrong = lora.LoRASpec(8, 8, 0.0, ("query",), None)
    with pytest.raises(ValueError, match="rank"):
        lora.LoRAWeights.from_peft(wrong, weights.peft_state_dict())


def test_install_refuses_non_linear(tiny_bert_dir):
    base = BaseModel.load(tiny_bert_dir, device="cpu")
    with pytest.raises(TypeError, match=r"not an nn\.Linear"):
        lora.install(base.backbone, ["embeddings.word_embeddings"])
