"""Drift monitoring, off the request path.

Predict hands every answered row to `Monitor.observe` (a queue put, nothing more). A background
thread keeps a sliding window of recent rows per adapter and, every `drift_check_every` new rows
once `drift_min_count` are there, compares the window with the live version's reference profile:
PSI of input length, the task's own prediction signals (`Task.drift_signals`: predicted labels and
confidence, or predicted values), and an RBF MMD permutation test on the pooled embeddings the
forward pass already computed.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load

from loradock.adapters import tasks
from loradock.adapters.artifacts.files import META, REFERENCE_JSON, REFERENCE_TENSORS
from loradock.adapters.artifacts.store import ArtifactStore, StoreError
from loradock.adapters.monitoring.drift import mmd_test, psi_signal
from loradock.adapters.monitoring.profile import histogram
from loradock.adapters.serving.engine import RowResult
from loradock.adapters.serving.slots import AdapterRef
from loradock.adapters.tasks.base import Task
from loradock.service.metrics import Metrics
from loradock.service.settings import Settings

log = logging.getLogger(__name__)
MMD_SAMPLE = 256


@dataclass
class _Window:
    ref: AdapterRef
    rows: deque[RowResult]
    live: bool = True  # its latest traffic resolved the live version (else: pinned, shadow)
    new: int = 0
    task: Task | None = None
    reference: dict[str, Any] | None = None
    reference_embeddings: torch.Tensor | None = None
    report: dict[str, Any] = field(default_factory=dict)


class Monitor:
    def __init__(self, store: ArtifactStore, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.s = settings
        self.metrics = metrics
        self._queue: queue.SimpleQueue[tuple[AdapterRef | None, list[RowResult], bool] | None] = (
            queue.SimpleQueue()
        )
        # Least recently observed first: beyond drift_max_adapters the oldest window is dropped,
        # so memory is bounded however many adapters take traffic.
        # One window per (adapter, version): traffic pinned to another version (shadow tests)
        # never resets the live version's window.
        self._windows: OrderedDict[tuple[str, int], _Window] = OrderedDict()
        self.evicted = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="loradock-monitor", daemon=True)
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def observe(self, ref: AdapterRef, rows: list[RowResult], live: bool = True) -> None:
        """Called on the request path: only a queue put. `live`: the request resolved the live
        version (not one it named), so its rows also drive the adapter's drift gauges."""
        self._idle.clear()
        self._queue.put((ref, rows, live))

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every observed row is processed (tests and reports)."""
        self._idle.clear()
        self._queue.put((None, [], False))  # a marker: once processed, what came before is too
        return self._idle.wait(timeout)

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            for key in [k for k in self._windows if k[0] == adapter_id]:
                del self._windows[key]
        self.metrics.forget_adapter(adapter_id)

    def report(self, adapter_id: str, version: int | None = None) -> dict[str, Any]:
        """The drift report of `version` (default: the adapter's most recent live traffic),
        with the windows of other versions that took pinned traffic under `shadow`."""
        with self._lock:
            mine = {v: w for (a, v), w in self._windows.items() if a == adapter_id}
            if version is None:
                live = [v for v, w in mine.items() if w.live]
                version = live[-1] if live else None
            w = mine.get(version) if version is not None else None
            out: dict[str, Any] = (
                {"status": "no traffic yet", "window_rows": 0}
                if w is None
                else {**w.report, "window_rows": len(w.rows), "version": w.ref.version}
            )
            shadow = {
                str(v): {**o.report, "window_rows": len(o.rows)}
                for v, o in mine.items()
                if v != version
            }
        if shadow:
            out["shadow"] = shadow
        return out

    # --- the background thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            ref, rows, live = item
            if ref is not None:
                try:
                    self._add(ref, rows, live)
                except Exception:  # the monitor must never take serving down
                    log.exception("monitor failed on %s", ref.adapter_id)
            if self._queue.empty():
                self._idle.set()

    def _add(self, ref: AdapterRef, rows: list[RowResult], live: bool = True) -> None:
        key = (ref.adapter_id, ref.version)
        with self._lock:
            w = self._windows.get(key)
            if w is None:
                w = _Window(ref, deque(maxlen=self.s.drift_window), live=live)
                self._windows[key] = w
            w.live = w.live or live  # once it served live traffic, it is a live window
            self._windows.move_to_end(key)
            while len(self._windows) > self.s.drift_max_adapters:
                self._windows.popitem(last=False)
                self.evicted += 1
        # Rows keep only what scoring needs: the pooled embedding in half precision (a copy,
        # never a view of the batch), the output and the length.
        w.rows.extend(
            RowResult(output=r.output, pooled=r.pooled.to(torch.float16), tokens=r.tokens)
            for r in rows
        )
        w.new += len(rows)
        self.metrics.adapter_requests(ref.adapter_id, ref.name, len(rows))
        if len(w.rows) >= self.s.drift_min_count and w.new >= self.s.drift_check_every:
            w.new = 0
            self._score(w)

    def _load_reference(self, w: _Window) -> bool:
        if w.reference is not None:
            return True
        key = w.ref.key
        try:
            w.task = tasks.from_meta(json.loads(self.store.read(key, META)))
            w.reference = json.loads(self.store.read(key, REFERENCE_JSON))
            w.reference_embeddings = st_load(self.store.read(key, REFERENCE_TENSORS))["embeddings"]
        except (StoreError, KeyError, ValueError) as e:
            w.report = {"status": f"no reference profile: {e}"}
            return False
        return True

    def _score(self, w: _Window) -> None:
        if not self._load_reference(w):
            return
        ref = w.reference
        assert ref is not None
        assert w.task is not None
        rows = list(w.rows)
        signals: dict[str, dict[str, Any]] = {}
        edges = ref["length_edges"]
        signals["input_length"] = psi_signal(
            ref["length_histogram"], histogram([r.tokens for r in rows], edges), edges=edges
        )
        signals.update(w.task.drift_signals(ref, [r.output for r in rows]))
        emb = self._embedding_signal(w, rows)
        if emb is not None:
            signals["embedding"] = emb
        drifted = [
            name
            for name, sig in signals.items()
            if sig.get("psi", 0) > self.s.drift_psi_threshold
            or sig.get("p_value", 1) < self.s.drift_p_value
        ]
        w.report = {"status": "scored", "signals": signals, "drifting": bool(drifted),
                    "drifted_signals": drifted, "rows_scored": len(rows)}  # fmt: skip
        if w.live:  # the adapter's gauges follow its live version, not shadow traffic
            self.metrics.adapter_drift(w.ref.adapter_id, w.ref.name, signals, bool(drifted))

    def _embedding_signal(self, w: _Window, rows: list[RowResult]) -> dict[str, Any] | None:
        ref = w.reference_embeddings
        if ref is None or len(ref) < 2 or len(rows) < 2:
            return None
        current = torch.stack([r.pooled for r in rows[-MMD_SAMPLE:]]).float()
        result = mmd_test(ref.float(), current, permutations=200)
        return {"mmd2": round(result.statistic, 6), "p_value": round(result.p_value, 4),
                "bandwidth": round(result.bandwidth, 4), "reference_rows": len(ref),
                "current_rows": len(current)}  # fmt: skip
