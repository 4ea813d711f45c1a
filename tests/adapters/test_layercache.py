import pytest
import torch

from loradock.adapters import tasks
from loradock.adapters.core import layercache
from loradock.adapters.core.base import BaseModel
from loradock.adapters.training import encoding
from loradock.adapters.training.data import validate_rows
from loradock.adapters.training.trainer import Hyperparameters, Trainer
from tests.datasets import keyword_rows

TEXTS = ["refund please", "my login password is not working", "late package tracking help"]


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_llama_dir"])
def test_skipping_with_cached_states_gives_the_same_output(request, fixture):
    base = BaseModel.load(request.getfixturevalue(fixture), device="cpu")
    names_before = [n for n, _ in base.backbone.named_modules()]
    assert layercache.install(base.backbone, base.num_layers)
    assert [n for n, _ in base.backbone.named_modules()] == names_before  # paths unchanged
    batch = base.tokenize(TEXTS)
    with torch.inference_mode():
        with layercache.capture_input_of(base.backbone, base.num_layers, 1) as captured:
            full = base.hidden_states(batch["input_ids"], batch["attention_mask"])
        skip = layercache.Skip(start=1, hidden=captured[0])
        with layercache.skipping(skip):
            skipped = base.hidden_states(batch["input_ids"], batch["attention_mask"])
        # garbage in the cache proves block 0 really was skipped
        with layercache.skipping(layercache.Skip(start=1, hidden=torch.zeros_like(captured[0]))):
            garbage = base.hidden_states(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(skipped, full)
    assert not torch.allclose(garbage, full)


def test_skipping_is_per_thread_and_off_by_default(tiny_bert_dir):
    base = BaseModel.load(tiny_bert_dir, device="cpu")
    before = base.embed(TEXTS)
    layercache.install(base.backbone, base.num_layers)
    assert torch.equal(base.embed(TEXTS), before)


def test_trainer_cache_matches_training_without_it(tiny_bert_dir, monkeypatch):
    rows = keyword_rows(20)
    hp = Hyperparameters(
        epochs=3, trainable_layers=1, early_stopping=False, learning_rate=0.05,
        init_head_l2=1e-3, batch_size=8, dropout=0.0,
    )  # fmt: skip

    def train():
        base = BaseModel.load(tiny_bert_dir, device="cpu")
        ds = validate_rows(rows, tasks.get("classification"), max_rows=1000, max_text_chars=1000)
        return Trainer(base).run(ds, hp)

    cached = train()
    assert cached.report["frozen_block_cache"].startswith("blocks 0..0 computed once")
    monkeypatch.setattr(encoding, "CACHE_BUDGET_BYTES", 0)
    uncached = train()
    assert uncached.report["frozen_block_cache"].startswith("off")
    # The same computation in another order: equal up to float rounding, which three epochs
    # at a high learning rate amplify a little (a stale or wrong cache is off by far more).
    first, *later = zip(cached.history, uncached.history, strict=True)
    assert first[0]["train_loss"] == pytest.approx(first[1]["train_loss"], abs=1e-4)
    for a, b in [first, *later]:
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=2e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=2e-3)
