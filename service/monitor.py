"""Drift monitoring, off the request path.

Predict hands every answered row to `Monitor.observe` (a queue put, nothing more). A background
thread keeps a sliding window of recent rows per adapter and, every `drift_check_every` new rows
once `drift_min_count` are there, compares the window with the live version's reference profile:
PSI of predicted labels, confidence and input length (regression: predicted values), and an RBF
MMD permutation test on the pooled embeddings the forward pass already computed.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load

from loradock.adapters.artifacts import REFERENCE_JSON, REFERENCE_TENSORS
from loradock.adapters.drift import mmd_test, psi_excess
from loradock.adapters.engine import RowResult
from loradock.adapters.profile import histogram
from loradock.adapters.store import ArtifactStore, StoreError
from loradock.service.metrics import Metrics
from loradock.service.settings import Settings

log = logging.getLogger(__name__)
MMD_SAMPLE = 256


@dataclass
class _Row:
    label: str | None
    confidence: float | None
    value: float | None
    tokens: int
    pooled: torch.Tensor


@dataclass
class _Window:
    adapter_id: str
    name: str
    version: int
    key: str
    rows: deque[_Row]
    new: int = 0
    reference: dict[str, Any] | None = None
    reference_embeddings: torch.Tensor | None = None
    report: dict[str, Any] = field(default_factory=dict)


class Monitor:
    def __init__(self, store: ArtifactStore, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.s = settings
        self.metrics = metrics
        self._queue: queue.SimpleQueue[tuple[str, str, int, str, list[RowResult]] | None] = (
            queue.SimpleQueue()
        )
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="loradock-monitor", daemon=True)
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def observe(
        self, adapter_id: str, name: str, version: int, key: str, rows: list[RowResult]
    ) -> None:
        """Called on the request path: only a queue put."""
        self._idle.clear()
        self._queue.put((adapter_id, name, version, key, rows))

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every observed row is processed (tests and reports)."""
        self._idle.clear()
        self._queue.put(("", "", 0, "", []))  # a marker: once processed, what came before is too
        return self._idle.wait(timeout)

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            self._windows.pop(adapter_id, None)
        self.metrics.forget_adapter(adapter_id)

    def report(self, adapter_id: str) -> dict[str, Any]:
        with self._lock:
            w = self._windows.get(adapter_id)
            if w is None:
                return {"status": "no traffic yet", "window_rows": 0}
            return {**w.report, "window_rows": len(w.rows), "version": w.version}

    # --- the background thread ---------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            adapter_id, name, version, key, rows = item
            if adapter_id:
                try:
                    self._add(adapter_id, name, version, key, rows)
                except Exception:  # the monitor must never take serving down
                    log.exception("monitor failed on %s", adapter_id)
            if self._queue.empty():
                self._idle.set()

    def _add(
        self, adapter_id: str, name: str, version: int, key: str, rows: list[RowResult]
    ) -> None:
        with self._lock:
            w = self._windows.get(adapter_id)
            if w is None or w.version != version:  # a new live version starts a new window
                w = _Window(adapter_id, name, version, key, deque(maxlen=self.s.drift_window))
                self._windows[adapter_id] = w
        for r in rows:
            out = r.output
            w.rows.append(
                _Row(out.get("label"), out.get("score"), out.get("value"), r.tokens, r.pooled)
            )
        w.new += len(rows)
        self.metrics.adapter_requests(adapter_id, name, len(rows))
        if len(w.rows) >= self.s.drift_min_count and w.new >= self.s.drift_check_every:
            w.new = 0
            self._score(w)

    def _load_reference(self, w: _Window) -> bool:
        if w.reference is not None:
            return True
        try:
            w.reference = json.loads(self.store.read(w.key, REFERENCE_JSON))
            w.reference_embeddings = st_load(self.store.read(w.key, REFERENCE_TENSORS))[
                "embeddings"
            ]
        except (StoreError, KeyError, ValueError) as e:
            w.report = {"status": f"no reference profile: {e}"}
            return False
        return True

    def _score(self, w: _Window) -> None:
        if not self._load_reference(w):
            return
        ref = w.reference
        assert ref is not None
        rows = list(w.rows)
        signals: dict[str, dict[str, Any]] = {}
        lengths = [r.tokens for r in rows]
        signals["input_length"] = self._psi_signal(
            ref["length_histogram"], histogram(lengths, ref["length_edges"]), ref["length_edges"]
        )
        if "label_distribution" in ref:
            labels = list(ref["label_distribution"])
            counts = Counter(r.label for r in rows)
            reference = [ref["label_distribution"][lbl] for lbl in labels]
            current = [counts.get(lbl, 0) for lbl in labels]
            raw, noise, excess = psi_excess(reference, current)
            signals["predicted_label"] = {
                "psi": round(excess, 4),
                "psi_raw": round(raw, 4),
                "psi_noise": round(noise, 4),
                "reference": dict(zip(labels, _shares(reference), strict=True)),
                "current": dict(zip(labels, _shares(current), strict=True)),
            }
            conf = [r.confidence or 0.0 for r in rows]
            signals["confidence"] = self._psi_signal(
                ref["confidence_histogram"],
                histogram(conf, ref["confidence_edges"]),
                ref["confidence_edges"],
            )
        elif "value_histogram" in ref:
            values = [r.value or 0.0 for r in rows]
            signals["predicted_value"] = self._psi_signal(
                ref["value_histogram"], histogram(values, ref["value_edges"]), ref["value_edges"]
            )
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
        self.metrics.adapter_drift(w.adapter_id, w.name, signals, bool(drifted))

    @staticmethod
    def _psi_signal(
        reference: Sequence[int], current: Sequence[int], edges: Sequence[float]
    ) -> dict:
        raw, noise, excess = psi_excess(reference, current)
        return {
            "psi": round(excess, 4),  # beyond what sampling noise alone would give
            "psi_raw": round(raw, 4),
            "psi_noise": round(noise, 4),
            "edges": list(edges),
            "reference": _shares(reference),
            "current": _shares(current),
        }

    def _embedding_signal(self, w: _Window, rows: list[_Row]) -> dict[str, Any] | None:
        ref = w.reference_embeddings
        if ref is None or len(ref) < 2 or len(rows) < 2:
            return None
        current = torch.stack([r.pooled for r in rows[-MMD_SAMPLE:]]).float()
        result = mmd_test(ref.float(), current, permutations=200)
        return {"mmd2": round(result.statistic, 6), "p_value": round(result.p_value, 4),
                "bandwidth": round(result.bandwidth, 4), "reference_rows": len(ref),
                "current_rows": len(current)}  # fmt: skip


def _shares(counts: Sequence[float]) -> list[float]:
    total = float(sum(counts)) or 1.0
    return [round(c / total, 4) for c in counts]
