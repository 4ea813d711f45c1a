"""Training inputs: token ids, length-bucketed batches, and the frozen-block cache.

Texts are tokenized once without padding; each batch pads only to its own longest text, and
batches are formed from length-sorted chunks so that little padding remains. When LoRA adapts only
the upper blocks, what enters the first adapted block is computed once per text (during the pass
that embeds the texts for the probe anyway) and fed to the upper blocks in every epoch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loradock.adapters.core import layercache, lora
from loradock.adapters.core.base import BaseModel
from loradock.adapters.training.data import Example

CACHE_BUDGET_BYTES = 2 * 1024**3  # most memory the frozen-block cache may take


@dataclass
class Encoded:
    """Token ids of a set of examples, and (when lower blocks are frozen) their cached states."""

    ids: list[list[int]]
    cached: list[torch.Tensor] | None = None  # per example: [tokens, hidden], input of block s

    def __len__(self) -> int:
        return len(self.ids)


class TrainingEncoder:
    """Encodes training examples for one base model and runs the training forward pass."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.device = base.device
        self.cache: dict[str, torch.Tensor] = {}
        self.skip_start = 0
        # On CUDA the cache lives in host memory and is copied per batch.
        self.cache_device = torch.device("cpu")

    def embed(
        self,
        texts: Sequence[str],
        start: int,
        report: dict[str, Any],
        between: Callable[[], object] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pooled frozen embeddings of every text (for the probe). When LoRA leaves the lower
        blocks frozen, the same pass also caches what enters the first adapted block.
        `between` runs before each batch (a cancel check, the yield to serving)."""
        n_tokens = sum(len(x) for x in self.tokenize_texts(texts))
        budget_ok = n_tokens * self.base.hidden_size * 4 <= CACHE_BUDGET_BYTES
        self.cache = {}
        self.skip_start = 0
        if (
            start == 0
            or not budget_ok
            or not layercache.install(self.base.backbone, self.base.num_layers)
        ):
            if start > 0:
                report["frozen_block_cache"] = "off: over the memory budget or unknown blocks"
            pooled = self.base.embed(list(texts), batch_size=64, between=between).cpu().clone()
            return {t: pooled[i] for i, t in enumerate(texts)}
        out: dict[str, torch.Tensor] = {}
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        blocks = (self.base.backbone, self.base.num_layers, start)
        with torch.inference_mode(), layercache.capture_input_of(*blocks) as captured:
            for s in range(0, len(order), 64):
                if between is not None:
                    between()
                idx = order[s : s + 64]
                batch = self.base.tokenize([texts[i] for i in idx])
                hidden = self.base.hidden_states(batch["input_ids"], batch["attention_mask"])
                pooled = BaseModel.mean_pool(hidden, batch["attention_mask"]).cpu()
                lower = captured.pop()
                lengths = batch["attention_mask"].sum(dim=1).tolist()
                for j, i in enumerate(idx):
                    out[texts[i]] = pooled[j].clone()
                    self.cache[texts[i]] = lower[j, : int(lengths[j])].to(self.cache_device).clone()
        self.skip_start = start
        report["frozen_block_cache"] = (
            f"blocks 0..{start - 1} computed once per text and cached ({n_tokens} tokens)"
        )
        return out

    def tokenize_texts(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.base.tokenizer(list(texts), truncation=True, max_length=self.base.max_length)
        return [list(x) for x in enc["input_ids"]]

    def encode(self, examples: Sequence[Example]) -> Encoded:
        ids = self.tokenize_texts([e.text for e in examples])
        cached = None
        if self.skip_start and self.cache:
            cached = [self.cache[e.text] for e in examples]
            assert all(len(c) == len(i) for c, i in zip(cached, ids, strict=True))
        return Encoded(ids=ids, cached=cached)

    def batches(self, enc: Encoded, batch_size: int, rng: random.Random) -> list[list[int]]:
        """Length-bucketed batches: shuffle, sort within chunks of 50 batches, shuffle batches."""
        ids = enc.ids
        order = list(range(len(ids)))
        rng.shuffle(order)
        chunk = batch_size * 50
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: len(ids[i]))
            batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
        rng.shuffle(batches)
        return batches

    def pad(self, ids: list[list[int]], rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids[i]) for i in rows)
        pad = self.base.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def forward(
        self,
        weights: lora.LoRAWeights,
        head: torch.nn.Module,
        enc: Encoded,
        rows: Sequence[int],
    ) -> torch.Tensor:
        input_ids, mask = self.pad(enc.ids, rows)
        skip = None
        if enc.cached is not None:
            # [batch, tokens, hidden]: what enters the first adapted block, padded like input_ids
            lower = torch.zeros(*input_ids.shape, self.base.hidden_size, dtype=self.base.dtype)
            for r, i in enumerate(rows):
                lower[r, : len(enc.cached[i])] = enc.cached[i]
            skip = layercache.Skip(self.skip_start, lower.to(self.device, non_blocking=True))
        with lora.active(weights), layercache.skipping(skip):
            hidden = self.base.hidden_states(input_ids, mask)
        pooled = BaseModel.mean_pool(hidden, mask)
        return head(pooled)
