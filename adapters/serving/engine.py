"""The inference engine: one forward pass of the base for a batch mixing many adapters.

Protocol-free: the /v1 and /v2 routes both call it, and it knows nothing of HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loradock.adapters.artifacts.files import load_adapter
from loradock.adapters.artifacts.store import ArtifactStore
from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel
from loradock.adapters.core.scheduling import PriorityGate
from loradock.adapters.core.tracing import tracer
from loradock.adapters.serving.slots import AdapterRef, BatchedLoRA, Resident, SlotPool
from loradock.adapters.tasks.base import Task
from loradock.adapters.tasks.probe import LinearHead


class BatchTooLarge(RuntimeError):
    """Even one row does not fit in device memory."""


@dataclass(frozen=True)
class ServedHead:
    """What the engine keeps with a resident adapter besides its LoRA slot."""

    task: Task
    head: LinearHead  # weight [n_outputs, hidden], bias [n_outputs], on the device


class _PooledOnly:
    """The base resident's 'task': its rows are wanted for their pooled embedding only."""

    @staticmethod
    def decode(row: torch.Tensor) -> dict[str, Any]:
        return {}


@dataclass
class RowResult:
    """One input's answer, plus what the monitor needs (pooled embedding, confidence, length)."""

    output: dict[str, Any]
    pooled: torch.Tensor  # [hidden] float32 on the CPU
    tokens: int

    def prediction(self, max_length: int) -> dict[str, Any]:
        """The answer as an API returns it: `truncated` when the text was cut at max_length."""
        out = dict(self.output)
        if self.tokens >= max_length:
            out["truncated"] = True
        return out


def length_chunks(
    lengths: Sequence[int], *, min_rows: int = 8, slack: float = 0.25
) -> list[list[int]]:
    """Row indices in chunks of similar length (ascending), so that each chunk pads little:
    once a chunk has `min_rows` rows, a row that would make its padded tokens exceed its real
    tokens by more than `slack` starts the next chunk. Equal lengths make one chunk."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        if len(current) >= min_rows and (len(current) + 1) * n > (1 + slack) * (real + n):
            chunks.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        chunks.append(current)
    return chunks


class Engine:
    """Resolves adapter versions to pool slots (loading them on a miss) and runs mixed batches."""

    def __init__(
        self,
        base: BaseModel,
        pool: SlotPool,
        store: ArtifactStore,
        gate: PriorityGate | None = None,
        on_load: Callable[[float], None] | None = None,
    ) -> None:
        self.base = base
        self.on_load = on_load  # called with the seconds each load from the store took
        self.pool = pool
        self.store = store
        self.gate = gate or PriorityGate()
        self.oom_splits = 0  # batches split after a CUDA out-of-memory error
        self._loading: dict[AdapterRef, threading.Lock] = {}
        self._loading_guard = threading.Lock()
        self._base_resident: Resident | None = None

    def acquire(self, ref: AdapterRef) -> Resident:
        """The resident adapter for `ref`, loaded from the store at `ref.key` on a miss. The
        caller must `release` it after the batch that uses it."""
        res = self.pool.get(ref, acquire=True)
        if res is not None:
            return res
        with self._loading_guard:
            lock = self._loading.setdefault(ref, threading.Lock())
        try:
            with lock:  # one load per adapter even when many requests miss at once
                res = self.pool.get(ref, acquire=True)
                if res is not None:
                    return res
                started = time.perf_counter()
                model = load_adapter(self.store, ref.key, self.base)
                # Heads stay float32 whatever the base's dtype: the pooled features are float32
                # and a head is a few KB.
                like = {"device": self.base.device, "dtype": torch.float32}
                if model.head is None:  # generation: no head; its rows are decoded as tokens
                    head = LinearHead(
                        torch.zeros(1, self.base.hidden_size, **like), torch.zeros(1, **like)
                    )
                else:
                    head = LinearHead(model.head.weight.to(**like), model.head.bias.to(**like))
                res = self.pool.load(ref, model.weights, ServedHead(model.task, head), acquire=True)
                if self.on_load is not None:
                    self.on_load(time.perf_counter() - started)
                return res
        finally:  # a failed load leaves nothing behind: the next request tries again
            with self._loading_guard:
                self._loading.pop(ref, None)

    def release(self, residents: Sequence[Resident]) -> None:
        self.pool.release([r.slot for r in residents])

    def base_resident(self) -> Resident:
        """The frozen base as a resident: slot 0 (no LoRA) and a one-output zero head whose
        predictions are empty, for rows that only want their pooled embedding (embeddings of
        the base). It rides in mixed batches like any adapter; nothing is loaded or held, so it is
        never acquired nor released."""
        if self._base_resident is None:
            like = {"device": self.base.device, "dtype": torch.float32}
            head = LinearHead(torch.zeros(1, self.base.hidden_size, **like), torch.zeros(1, **like))
            ref = AdapterRef(adapter_id="", version=0, name="base")
            self._base_resident = Resident(ref, 0, ServedHead(_PooledOnly(), head))  # type: ignore[arg-type]
        return self._base_resident

    def run(self, residents: Sequence[Resident], texts: Sequence[str]) -> list[RowResult]:
        """Row i of `texts` through adapter residents[i]; all rows in one base forward pass."""
        if not texts:
            return []
        return self.run_encoded(residents, self.base.encode(texts))

    def run_encoded(
        self, residents: Sequence[Resident], ids: Sequence[Sequence[int]]
    ) -> list[RowResult]:
        """Like `run`, for texts already encoded by `base.encode` (the batcher's path: requests
        are tokenized once, before admission, so they are counted in tokens).

        A batch that does not fit in GPU memory is split in halves and retried; a single row that
        does not fit raises BatchTooLarge (the API answers 503 with the reason).
        """
        if not ids:
            return []
        try:
            with tracer.start_as_current_span(
                "loradock.forward",
                attributes={"loradock.rows": len(ids), "loradock.tokens": sum(map(len, ids))},
            ):
                return self._run(residents, ids)
        except torch.cuda.OutOfMemoryError as e:
            if self.base.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(ids) == 1:
                raise BatchTooLarge(
                    f"one text of {len(ids[0])} tokens does not fit in device memory"
                ) from e
            half = len(ids) // 2
            self.oom_splits += 1
            return self.run_encoded(residents[:half], ids[:half]) + self.run_encoded(
                residents[half:], ids[half:]
            )

    def warm_up(self) -> None:
        """A forward pass through the batched LoRA path, so the first request pays no set-up."""
        with torch.inference_mode(), lora.active(BatchedLoRA(self.pool, [1, 0])):
            batch = self.base.tokenize(["loradock warm-up", "a second warm-up text"])
            self.base.hidden_states(batch["input_ids"], batch["attention_mask"])

    @torch.inference_mode()
    def _run(self, residents: Sequence[Resident], ids: Sequence[Sequence[int]]) -> list[RowResult]:
        with self.gate.serving():
            # On the CPU a pass costs about its padded tokens: rows of very different lengths
            # run as a few length-sorted chunks (bench/README.md). A GPU takes one pass.
            chunks = [list(range(len(ids)))]
            if self.base.device.type == "cpu":
                by_length = length_chunks([len(row) for row in ids])
                if len(by_length) > 1:
                    chunks = by_length
            parts = []
            for rows in chunks:
                host = self.base.pad([ids[i] for i in rows])
                batch = self.base.to_device(host)
                ctx = BatchedLoRA(self.pool, [residents[i].slot for i in rows])
                with lora.active(ctx):
                    hidden = self.base.hidden_states(batch["input_ids"], batch["attention_mask"])
                parts.append(self.base.mean_pool(hidden, batch["attention_mask"]))  # fp32
            if len(chunks) == 1:
                pooled = parts[0]  # [B, hidden] fp32
            else:
                order = torch.tensor([i for rows in chunks for i in rows])
                pooled = parts[0].new_empty(len(ids), parts[0].shape[1])
                pooled[order.to(pooled.device)] = torch.cat(parts)
            head_out = self._heads(residents, pooled)  # [B, max outputs] fp32
            # One device->host copy per batch: pooled embeddings and head outputs together.
            both = torch.cat([pooled, head_out], dim=1).cpu()
        hidden_size = pooled.shape[1]
        return [
            RowResult(
                output=self._decode(residents[i], both[i, hidden_size:]),
                # A copy: a view would keep the whole batch's tensor alive in the drift window.
                pooled=both[i, :hidden_size].clone(),
                tokens=len(ids[i]),
            )
            for i in range(len(ids))
        ]

    @staticmethod
    def _heads(residents: Sequence[Resident], pooled: torch.Tensor) -> torch.Tensor:
        """Each row through its own adapter's head, rows grouped per adapter (one matmul each),
        all on the device. pooled [B, hidden] -> [B, max outputs] (unused columns zero)."""
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(residents):
            groups.setdefault(id(r), []).append(i)
        width = max(r.state.head.weight.shape[0] for r in residents)
        out = torch.zeros(len(residents), width, device=pooled.device, dtype=torch.float32)
        for rows in groups.values():
            head = residents[rows[0]].state.head
            idx = torch.tensor(rows).to(pooled.device, non_blocking=True)
            x = pooled.index_select(0, idx)
            logits = x @ head.weight.float().t() + head.bias.float()
            out[idx, : logits.shape[1]] = logits
        return out

    @staticmethod
    def _decode(res: Resident, row: torch.Tensor) -> dict[str, Any]:
        """One row's head output (host memory) as a prediction."""
        return res.state.task.decode(row)
