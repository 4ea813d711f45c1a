"""The adapter slot pool and the batched LoRA forward (BGMV style) for serving many adapters.

Per targeted Linear layer the pool preallocates, on the base model's device:
    A: [slots + 1, r_max, d_in]     B: [slots + 1, d_out, r_max]     scale: [slots + 1]
Slot 0 is all zeros: "no LoRA" (base model, or a head-only adapter). Loading an adapter copies its
matrices into a free slot (ranks below r_max are zero-padded): constant time however many adapters
are resident. A forward pass over a mixed batch gathers each row's slot and adds
    y[i] = base(x[i]) + scale[s_i] * (x[i] @ A[s_i]^T) @ B[s_i]^T
with one gather and two bmm per targeted layer for the whole batch.

Residency: LRU over the device slots; an evicted adapter's matrices move to a bounded CPU tier
(pinned host memory on CUDA) before being dropped; pinned adapters are never evicted; a slot with
in-flight users (acquire/release) is never reused.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from loradock.adapters.core import lora
from loradock.adapters.core.base import BaseModel


class CapacityError(RuntimeError):
    """No slot can be freed: every resident adapter is pinned or in use."""


class IncompatibleAdapter(ValueError):
    """An adapter whose shape the pool cannot hold (rank or target layers)."""


@dataclass(frozen=True)
class AdapterRef:
    """One servable adapter version, as it travels the predict path (route -> batcher -> engine
    -> monitor): small, immutable, hashable. Identity is (adapter_id, version); the other fields
    say what to call it, where its files are and which task it serves."""

    adapter_id: str
    version: int
    name: str = field(default="", compare=False)
    key: str = field(default="", compare=False)  # its artifact in the store
    task: str = field(default="", compare=False)


@dataclass
class Resident:
    """Where a loaded adapter lives: its LoRA slot (0 = none), plus what the engine keeps with
    it (its task and head); the pool holds LoRA weights only and never reads `state`."""

    ref: AdapterRef
    slot: int
    state: Any


@dataclass
class _HostCopy:
    a: dict[str, torch.Tensor]  # name -> [r, d_in]
    b: dict[str, torch.Tensor]  # name -> [d_out, r]
    scale: float


class SlotPool:
    """Device slots for LoRA matrices, plus the per-adapter heads and a CPU tier."""

    def __init__(
        self,
        base: BaseModel,
        target_modules: Sequence[str],
        *,
        max_rank: int,
        capacity: int,
        cpu_capacity: int = 0,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        """`lora_dtype`: the slots' A/B dtype (default the base's). float32 under a bf16 base
        keeps each delta's low bits (x is cast up per layer and the delta back down)."""
        if capacity < 1 or max_rank < 1:
            raise ValueError("capacity and max_rank must be at least 1")
        self.base = base
        self.device = base.device
        self.dtype = lora_dtype or base.dtype
        self.max_rank = max_rank
        self.capacity = capacity
        self.cpu_capacity = cpu_capacity
        shapes = {
            t.name: (t.in_features, t.out_features)
            for t in base.linear_targets()
            if t.suffix in set(target_modules)
        }
        if not shapes:
            raise ValueError(f"target_modules {list(target_modules)} match no Linear layer")
        self.target_modules = tuple(target_modules)
        self.names = sorted(shapes)
        n = capacity + 1
        self.A = {
            name: torch.zeros(n, max_rank, d_in, device=self.device, dtype=self.dtype)
            for name, (d_in, _) in shapes.items()
        }
        self.B = {
            name: torch.zeros(n, d_out, max_rank, device=self.device, dtype=self.dtype)
            for name, (_, d_out) in shapes.items()
        }
        self.scale = torch.zeros(n, device=self.device, dtype=self.dtype)
        lora.install(base.backbone, self.names)

        self._lock = threading.Lock()
        self._free = list(range(capacity, 0, -1))  # pop() hands out slot 1 first
        self._lru: OrderedDict[AdapterRef, Resident] = OrderedDict()  # oldest first
        self._in_use = [0] * n  # in-flight users per slot
        self._pinned: set[AdapterRef] = set()
        self._retire: set[int] = set()  # slots of dropped adapters still used by a batch
        self._cpu: OrderedDict[AdapterRef, tuple[Resident, _HostCopy]] = OrderedDict()
        self.loads = self.evictions = self.hits = self.misses = 0

    # --- facts ---------------------------------------------------------------------------------

    def bytes_per_slot(self) -> int:
        per = sum(a[0].numel() + self.B[n][0].numel() for n, a in self.A.items()) + 1
        return per * self.scale.element_size()

    def resident(self) -> int:
        with self._lock:
            return len(self._lru)

    def cpu_resident(self) -> int:
        with self._lock:
            return len(self._cpu)

    # --- lookups -------------------------------------------------------------------------------

    def get(self, ref: AdapterRef, *, acquire: bool = False) -> Resident | None:
        """The resident entry for `ref` (marking it recently used), promoting it from the CPU
        tier into a device slot if it is there; None when it must be loaded from the store.

        With acquire=True the slot is held for the caller (atomically with the lookup, so it
        cannot be evicted in between) until `release([res.slot])`.
        """
        with self._lock:
            res = self._lru.get(ref)
            if res is not None:
                self._lru.move_to_end(ref)
                self.hits += 1
                if acquire:
                    self._in_use[res.slot] += 1
                return res
            parked = self._cpu.pop(ref, None)
            if parked is None:
                self.misses += 1
                return None
            res, host = parked
            res.slot = self._place(host) if host.a else 0
            self._lru[ref] = res
            self.hits += 1
            if acquire:
                self._in_use[res.slot] += 1
            return res

    def load(
        self,
        ref: AdapterRef,
        weights: lora.LoRAWeights | None,
        state: Any = None,
        *,
        acquire: bool = False,
    ) -> Resident:
        """Make `ref` servable: copy its matrices into a free slot (evicting if needed); `state`
        is kept with it for the caller (the engine keeps the task and head there)."""
        host = self._host_copy(weights)
        with self._lock:
            existing = self._lru.get(ref)
            if existing is not None:
                if acquire:
                    self._in_use[existing.slot] += 1
                return existing
            slot = self._place(host) if host.a else 0
            res = Resident(ref=ref, slot=slot, state=state)
            self._lru[ref] = res
            self.loads += 1
            if acquire:
                self._in_use[slot] += 1
            return res

    def _host_copy(self, weights: lora.LoRAWeights | None) -> _HostCopy:
        if weights is None:
            return _HostCopy(a={}, b={}, scale=0.0)
        if weights.spec.rank > self.max_rank:
            raise IncompatibleAdapter(
                f"LoRA rank {weights.spec.rank} > max_lora_rank {self.max_rank} of this server"
            )
        unknown = sorted(set(weights.names) - set(self.names))
        if unknown:
            raise IncompatibleAdapter(
                f"adapter targets {unknown[:3]} which this server does not serve "
                f"(serving targets: {', '.join(self.target_modules)})"
            )
        a = {n: weights.A[i].detach() for i, n in enumerate(weights.names)}
        b = {n: weights.B[i].detach() for i, n in enumerate(weights.names)}
        return _HostCopy(a=a, b=b, scale=weights.spec.scale)

    def _place(self, host: _HostCopy) -> int:
        """Copy into a free slot (caller holds the lock). Constant time in resident count."""
        if not self._free:
            self._evict_one()
        slot = self._free.pop()
        for name in self.names:
            self.A[name][slot].zero_()
            self.B[name][slot].zero_()
        for name, a in host.a.items():
            r = a.shape[0]
            self.A[name][slot, :r].copy_(a, non_blocking=True)
            self.B[name][slot, :, :r].copy_(host.b[name], non_blocking=True)
        self.scale[slot] = host.scale
        return slot

    def _evict_one(self) -> None:
        for ref, res in self._lru.items():  # oldest first
            if res.slot == 0 or ref in self._pinned or self._in_use[res.slot] > 0:
                continue
            self._park(ref, res)
            return
        raise CapacityError(
            f"all {self.capacity} adapter slots are pinned or in use; raise max_resident_adapters"
        )

    def _park(self, ref: AdapterRef, res: Resident) -> None:
        """Move a resident adapter to the CPU tier (or drop it) and free its slot."""
        del self._lru[ref]
        self.evictions += 1
        if res.slot:
            host = self._read_slot(res.slot)
            self._free.append(res.slot)
            res.slot = -1
        else:
            host = _HostCopy(a={}, b={}, scale=0.0)
        if self.cpu_capacity > 0:
            self._cpu[ref] = (res, host)
            while len(self._cpu) > self.cpu_capacity:
                self._cpu.popitem(last=False)

    def _read_slot(self, slot: int) -> _HostCopy:
        if self.cpu_capacity <= 0:
            return _HostCopy(a={}, b={}, scale=0.0)
        pin = self.device.type == "cuda"
        a, b = {}, {}
        for name in self.names:
            ta = self.A[name][slot].to("cpu", copy=True)  # a copy even when the device is the CPU
            tb = self.B[name][slot].to("cpu", copy=True)
            a[name] = ta.pin_memory() if pin else ta
            b[name] = tb.pin_memory() if pin else tb
        return _HostCopy(a=a, b=b, scale=float(self.scale[slot]))

    # --- lifecycle of one adapter --------------------------------------------------------------

    def pin(self, ref: AdapterRef) -> None:
        with self._lock:
            self._pinned.add(ref)

    def unpin(self, ref: AdapterRef) -> None:
        with self._lock:
            self._pinned.discard(ref)

    def drop(self, adapter_id: str) -> int:
        """Forget every version of an adapter (deleted). In-flight batches keep their slot
        until they release it. Returns how many versions were dropped."""
        with self._lock:
            doomed = [r for r in self._lru if r.adapter_id == adapter_id]
            for ref in doomed:
                res = self._lru.pop(ref)
                self._pinned.discard(ref)
                if res.slot > 0:
                    if self._in_use[res.slot] > 0:
                        self._retire.add(res.slot)
                    else:
                        self._free.append(res.slot)
            for ref in [r for r in self._cpu if r.adapter_id == adapter_id]:
                del self._cpu[ref]
            return len(doomed)

    def release(self, slots: Sequence[int]) -> None:
        with self._lock:
            for s in slots:
                self._in_use[s] -= 1
                if s in self._retire and self._in_use[s] == 0:
                    self._retire.discard(s)
                    self._free.append(s)


class BatchedLoRA:
    """A LoRA context for a mixed batch: row i uses slot slots[i] (0 = no LoRA).

    Semantics: for x [B, T, d_in] entering layer `name`,
        delta[i] = scale[s_i] * (x[i] @ A[name][s_i]^T) @ B[name][s_i]^T     -> [B, T, d_out]
    """

    def __init__(self, pool: SlotPool, slots: Sequence[int], *, reuse: bool = False) -> None:
        """`reuse`: keep each layer's gathered A and scaled B for later calls (a decode batch
        runs many steps with the same rows: one gather per layer instead of one per step). The
        slots must stay held (acquired) while the context is used."""
        self.pool = pool
        self.any = any(s > 0 for s in slots)  # decided on the host: no device sync later
        self.idx = torch.tensor(list(slots), dtype=torch.long).to(pool.device, non_blocking=True)
        self.scale = pool.scale.index_select(0, self.idx).view(-1, 1, 1)  # [B, 1, 1]
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if reuse else None

    def _gathered(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        kept = self._kept.get(name) if self._kept is not None else None
        if kept is not None:
            return kept
        a_all = self.pool.A.get(name)
        if a_all is None:
            return None
        a_t = a_all.index_select(0, self.idx).transpose(1, 2)  # [B, d_in, r]
        b_t = self.pool.B[name].index_select(0, self.idx).transpose(1, 2)  # [B, r, d_out]
        if self._kept is not None:
            b_t = b_t * self.scale  # folded once: (x A^T) (s B^T) = s (x A^T B^T)
            self._kept[name] = (a_t, b_t)
        return a_t, b_t

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if not self.any:
            return None
        gathered = self._gathered(name)
        if gathered is None:
            return None
        a_t, b_t = gathered
        h = torch.bmm(x.to(a_t.dtype), a_t)  # [B, T, r]
        if self._kept is not None:
            return torch.bmm(h, b_t).to(x.dtype)  # [B, T, d_out], the scale already in b_t
        return (torch.bmm(h, b_t) * self.scale).to(x.dtype)  # [B, T, d_out]
