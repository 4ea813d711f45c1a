"""Prometheus metrics as an object with its own registry (never the global one)."""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import torch
import transformers
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loradock.adapters.training.served import served_metrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TRAINING_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
# Why a predict request failed, from its status: a bounded label set.
FAILURE_REASONS = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    409: "conflict", 413: "too_large", 422: "invalid", 429: "overloaded", 503: "unavailable",
}  # fmt: skip

log = logging.getLogger(__name__)


class Metrics:
    """Every metric the server exports. Prefix `loradock_`, base units, counters end in `_total`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Info(
            "loradock_build", "Version of loradock and of the libraries it runs on.", registry=r
        )
        self.build_info.info(
            {
                "version": version("loradock"),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
        self.base_model_info = Info(
            "loradock_base_model", "The frozen base model this process serves.", registry=r
        )
        self.base_model_load_seconds = Gauge(
            "loradock_base_model_load_seconds",
            "Seconds it took to load and warm up the base model at start.",
            registry=r,
        )
        self.base_model_parameters = Gauge(
            "loradock_base_model_parameters", "Parameters of the base model.", registry=r
        )
        self.base_model_bytes = Gauge(
            "loradock_base_model_bytes", "Bytes of base model weights in memory.", registry=r
        )
        self.ready = Gauge(
            "loradock_ready", "1 when the server accepts traffic, 0 while starting or draining.",
            registry=r,
        )  # fmt: skip
        self.start_time = Gauge(
            "loradock_start_time_seconds", "Unix time the server process started.", registry=r
        )
        self.start_time.set(time.time())
        self.http_requests = Counter(
            "loradock_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_request_seconds = Histogram(
            "loradock_http_request_duration_seconds",
            "Time from request to response, by route template.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # --- serving (no adapter label on any of these) --------------------------------------
        self.predict_requests = Counter(
            "loradock_predict_requests",
            "Predict requests answered, by protocol (v1, v2, embeddings, or feedback: texts "
            "predicted to score their true labels).",
            ["protocol"],
            registry=r,
        )
        self.predict_failures = Counter(
            "loradock_predict_failures",
            "Predict requests that failed, by protocol and reason.",
            ["protocol", "reason"],
            registry=r,
        )
        self.predict_rows = Counter(
            "loradock_predict_rows", "Texts predicted (rows), all adapters.", registry=r
        )
        self.predict_seconds = Histogram(
            "loradock_predict_duration_seconds",
            "Predict request latency: resolve, queue, inference, response.",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "loradock_queue_wait_seconds",
            "Time a predict request waited in the micro-batcher before its batch ran.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "loradock_batch_rows", "Rows per forward pass.", buckets=ROW_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "loradock_inference_duration_seconds",
            "Time of one batched forward pass (tokenize, forward, heads).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_rows = Gauge(
            "loradock_queue_rows", "Rows waiting in the micro-batcher.", registry=r
        )
        # Generation (chat/completions through the continuous-batching engine)
        self.generation_ttft = Histogram(
            "loradock_generation_time_to_first_token_seconds",
            "From a generation entering the queue to its first token (queue, prefill, sampling).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_itl = Histogram(
            "loradock_generation_inter_token_seconds",
            "Time between two tokens of one generation.",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.generation_prompt_tokens = Counter(
            "loradock_generation_prompt_tokens",
            "Prompt tokens of finished generations.",
            registry=r,
        )
        self.generation_tokens = Counter(
            "loradock_generation_tokens",
            "Tokens generated (finished generations).",
            registry=r,
        )
        self.generation_ended = Counter(
            "loradock_generation_sequences",
            "Generations ended, by reason: stop, length, cancelled (the client went away), "
            "overloaded (queue wait), shutdown, internal.",
            ["reason"],
            registry=r,
        )
        self.generation_running = Gauge(
            "loradock_generation_running_sequences",
            "Generations in the decode batch (or being prefilled).",
            registry=r,
        )
        self.generation_waiting = Gauge(
            "loradock_generation_waiting_sequences",
            "Generations waiting for a place in the decode batch.",
            registry=r,
        )
        self.generation_kv_usage = Gauge(
            "loradock_generation_kv_cache_usage_ratio",
            "KV-cache entries the decode batch holds, as a share of "
            "LORADOCK_GENERATION_KV_BUDGET_TOKENS.",
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loradock_adapter_load_duration_seconds",
            "Time to make a stored adapter servable (read, verify, copy into a slot).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_load_failures = Counter(
            "loradock_adapter_load_failures",
            "Adapter versions that could not be made servable, by reason (corrupt: files do not "
            "match the manifest; missing: not in the store; incompatible: does not fit this base "
            "or its slots; capacity: every slot busy).",
            ["reason"],
            registry=r,
        )

        # --- training ------------------------------------------------------------------------
        self.training_epochs = Counter(
            "loradock_training_epochs", "Training epochs completed, all jobs.", registry=r
        )
        self.training_steps = Counter(
            "loradock_training_steps", "Optimizer steps taken, all jobs.", registry=r
        )
        self.training_loss = Gauge(
            "loradock_training_job_loss",
            "Last training and validation loss of each running job (removed when it ends).",
            ["job", "split"],
            registry=r,
        )
        self.job_workers_alive = Gauge(
            "loradock_job_workers_alive",
            "Training worker threads alive in this process (compare with LORADOCK_JOB_WORKERS).",
            registry=r,
        )
        self.job_worker_restarts = Counter(
            "loradock_job_worker_restarts",
            "Training worker threads that died and were restarted by the supervisor.",
            registry=r,
        )
        self.jobs_finished = Counter(
            "loradock_training_jobs_finished",
            "Training jobs that ended, by final status.",
            ["status"],
            registry=r,
        )
        self.stops = Counter(
            "loradock_training_stops",
            "Why training stopped: early_stopping, max_epochs, cancelled, diverged.",
            ["reason"],
            registry=r,
        )
        self.training_seconds = Histogram(
            "loradock_training_duration_seconds",
            "Wall time of finished training jobs.",
            buckets=TRAINING_BUCKETS,
            registry=r,
        )

        # --- per adapter (label `adapter` = adapter id; capped, beyond it aggregates only) -----
        self.max_adapter_series = 1000
        self._adapter_series: set[str] = set()
        self._drifting: set[str] = set()
        self.adapter_rows = Counter(
            "loradock_adapter_requests",
            "Rows predicted per adapter (for the first max_adapter_series adapters).",
            ["adapter"],
            registry=r,
        )
        self.adapter_drift_score = Gauge(
            "loradock_adapter_drift_score",
            "Last drift score per adapter and signal: PSI (predicted_label, confidence, "
            "input_length, predicted_value) or MMD^2 (embedding).",
            ["adapter", "signal"],
            registry=r,
        )
        self.adapter_drift_p_value = Gauge(
            "loradock_adapter_embedding_drift_p_value",
            "Permutation p-value of the embedding MMD test (small = drifted).",
            ["adapter"],
            registry=r,
        )
        self.adapter_drifting = Gauge(
            "loradock_adapter_drifting",
            "1 when the adapter's last drift check found a drifted signal.",
            ["adapter"],
            registry=r,
        )
        self.adapters_drifting = Gauge(
            "loradock_adapters_drifting",
            "Adapters whose last drift check found drift (all adapters, uncapped).",
            registry=r,
        )

    def _has_series(self, adapter_id: str) -> bool:
        if adapter_id in self._adapter_series:
            return True
        if len(self._adapter_series) >= self.max_adapter_series:
            return False
        self._adapter_series.add(adapter_id)
        return True

    def adapter_requests(self, adapter_id: str, name: str, rows: int) -> None:
        if self._has_series(adapter_id):
            self.adapter_rows.labels(adapter_id).inc(rows)

    def adapter_drift(
        self, adapter_id: str, name: str, signals: dict[str, dict[str, Any]], drifting: bool
    ) -> None:
        (self._drifting.add if drifting else self._drifting.discard)(adapter_id)
        self.adapters_drifting.set(len(self._drifting))
        if not self._has_series(adapter_id):
            return
        for signal, values in signals.items():
            score = values.get("psi", values.get("mmd2"))
            if score is not None:
                self.adapter_drift_score.labels(adapter_id, signal).set(score)
        if "embedding" in signals:
            self.adapter_drift_p_value.labels(adapter_id).set(signals["embedding"]["p_value"])
        self.adapter_drifting.labels(adapter_id).set(1 if drifting else 0)

    def is_drifting(self, adapter_id: str) -> bool:
        """Whether this process's last drift check of the adapter found a drifted signal."""
        return adapter_id in self._drifting

    def forget_adapter(self, adapter_id: str) -> None:
        """A deleted adapter's series go away (and free a place under the cap)."""
        self._drifting.discard(adapter_id)
        self.adapters_drifting.set(len(self._drifting))
        if adapter_id not in self._adapter_series:
            return
        self._adapter_series.discard(adapter_id)
        for gauge in (self.adapter_rows, self.adapter_drift_p_value, self.adapter_drifting):
            with contextlib.suppress(KeyError):
                gauge.remove(adapter_id)
        for signal in ("predicted_label", "confidence", "input_length", "predicted_value",
                       "embedding"):  # fmt: skip
            with contextlib.suppress(KeyError):
                self.adapter_drift_score.remove(adapter_id, signal)

    def failure_reason(self, status: int) -> str:
        return FAILURE_REASONS.get(status, "internal" if status >= 500 else "other")

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class HTTPMetricsMiddleware:
    """Pure ASGI middleware (works with streaming responses) counting and timing every request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The router records the matched route in the scope: label by its template, so the
            # label set stays bounded whatever paths clients send.
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "")
            self.metrics.http_requests.labels(template, method, str(status)).inc()
            self.metrics.http_request_seconds.labels(template, method).observe(
                time.perf_counter() - start
            )


class StateCollector:
    """Metrics read at scrape time from live state (nothing on the request path):
    adapters resident per tier and adapter cache counters (in memory, always current), and the
    registry's aggregates (jobs per state, every adapter's quality), which are read at most once
    per `cache_seconds` whatever the scrape rate, so scrapes cost the registry a bounded load."""

    def __init__(
        self, pool: Any, db: Any, max_adapters: int = 1000, cache_seconds: float = 15.0
    ) -> None:
        self.pool = pool
        self.db = db
        self.max_adapters = max_adapters
        self.cache_seconds = cache_seconds
        self._cached: list[Any] = []
        self._cached_at = float("-inf")
        self._lock = threading.Lock()
        self.registry_reads = 0  # how often the registry was queried (tests, debugging)

    def describe(self) -> list[Any]:
        return []  # registered without auto-describe: collected only at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        resident = GaugeMetricFamily(
            "loradock_adapters_resident", "Adapters resident, by tier.", labels=["tier"]
        )
        resident.add_metric(["device"], self.pool.resident())
        resident.add_metric(["cpu"], self.pool.cpu_resident())
        yield resident
        yield GaugeMetricFamily(
            "loradock_adapter_slots", "Adapter slots preallocated on the device.",
            value=self.pool.capacity,
        )  # fmt: skip
        for name, value, doc in (
            ("hits", self.pool.hits, "Lookups of an adapter that was resident."),
            ("misses", self.pool.misses, "Lookups that had to load from the store."),
            ("evictions", self.pool.evictions, "Adapters evicted from a device slot."),
            ("loads", self.pool.loads, "Adapters loaded into the pool."),
        ):
            yield CounterMetricFamily(f"loradock_adapter_cache_{name}", doc, value=value)
        yield from self._registry_families()

    def _registry_families(self) -> list[Any]:
        with self._lock:  # concurrent scrapes wait for one read instead of each querying
            if time.monotonic() - self._cached_at >= self.cache_seconds:
                try:
                    self._cached = [self._jobs(), *self._quality()]
                    self.registry_reads += 1
                except Exception:  # a scrape must never fail because the registry is busy
                    log.warning("metrics: the registry could not be read; serving the last "
                                "values", exc_info=True)  # fmt: skip
                self._cached_at = time.monotonic()
            return list(self._cached)

    def _jobs(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily
        from sqlalchemy import func, select

        from loradock.service.db.models import Job

        jobs = GaugeMetricFamily(
            "loradock_training_jobs", "Training jobs in the registry, by state.", labels=["state"]
        )
        counts = {s: 0 for s in ("queued", "running", "succeeded", "failed", "cancelled")}
        with self.db.session() as s:
            for state, n in s.execute(select(Job.status, func.count()).group_by(Job.status)):
                counts[state] = n
        for state, n in counts.items():
            jobs.add_metric([state], n)
        return jobs

    def _quality(self) -> Iterator[Any]:
        """Validation and live quality of every adapter's live version (capped series)."""
        from prometheus_client.core import GaugeMetricFamily
        from sqlalchemy import case, func, select

        from loradock.service.db.models import Adapter, Feedback, Version

        families = {
            "val_loss": GaugeMetricFamily(
                "loradock_adapter_validation_loss",
                "Validation loss of the live version's served model (LoRA, or the probe when "
                "it won).",
                labels=["adapter"]),
            "val_accuracy": GaugeMetricFamily(
                "loradock_adapter_validation_accuracy",
                "Validation accuracy of the live version's served model.",
                labels=["adapter"]),
            "val_macro_f1": GaugeMetricFamily(
                "loradock_adapter_validation_macro_f1",
                "Validation macro-F1 of the live version's served model.",
                labels=["adapter"]),
            "generalization_gap": GaugeMetricFamily(
                "loradock_adapter_generalization_gap",
                "Validation minus training loss at the live version's best epoch.",
                labels=["adapter"]),
            "baseline_won": GaugeMetricFamily(
                "loradock_adapter_baseline_won",
                "1 when the cheaper alternative beat LoRA on validation and is served (the "
                "linear probe; for generation, the base model).",
                labels=["adapter"]),
            "reference_perplexity": GaugeMetricFamily(
                "loradock_adapter_reference_perplexity",
                "Perplexity of the fixed reference text under the live version (generation): "
                "above the base's, the adapter lost some general language ability.",
                labels=["adapter"]),
            "base_reference_perplexity": GaugeMetricFamily(
                "loradock_adapter_base_reference_perplexity",
                "Perplexity of the fixed reference text under the base model, as measured when "
                "the live version was trained (generation).",
                labels=["adapter"]),
            "live_accuracy": GaugeMetricFamily(
                "loradock_adapter_live_accuracy",
                "Accuracy of the live version on feedback (true labels from production).",
                labels=["adapter"]),
            "live_gap": GaugeMetricFamily(
                "loradock_adapter_live_accuracy_gap",
                "Validation accuracy minus live accuracy (overfitting seen in production).",
                labels=["adapter"]),
            "feedback_items": GaugeMetricFamily(
                "loradock_adapter_feedback_items",
                "Labelled feedback items behind the live accuracy (alerts want enough of them).",
                labels=["adapter"]),
        }  # fmt: skip
        with self.db.session() as s:
            rows = s.execute(
                select(Adapter.id, Version.metrics, Version.baseline, Version.report)
                .join(
                    Version,
                    (Version.adapter_id == Adapter.id) & (Version.version == Adapter.live_version),
                )
                .order_by(Adapter.created_at, Adapter.id)
                .limit(self.max_adapters)
            ).all()
            live = {
                (a, v): (n, c)
                for a, v, n, c in s.execute(
                    select(Feedback.adapter_id, Feedback.version, func.count(Feedback.id),
                           func.sum(case((Feedback.label == Feedback.predicted, 1), else_=0)))
                    .group_by(Feedback.adapter_id, Feedback.version)
                )
            }  # fmt: skip
            versions = dict(s.execute(select(Adapter.id, Adapter.live_version)).all())
        for adapter_id, metrics, baseline, report in rows:
            served = served_metrics(metrics, baseline, (report or {}).get("winner"))
            won = served["model"] != "lora"
            for key in ("val_loss", "val_accuracy", "val_macro_f1"):
                if served.get(key) is not None:
                    families[key].add_metric([adapter_id], served[key])
            if metrics and metrics.get("generalization_gap") is not None:
                families["generalization_gap"].add_metric(
                    [adapter_id], metrics["generalization_gap"]
                )
            families["baseline_won"].add_metric([adapter_id], 1 if won else 0)
            for key in ("reference_perplexity", "base_reference_perplexity"):
                if metrics and metrics.get(key) is not None:
                    families[key].add_metric([adapter_id], metrics[key])
            n, correct = live.get((adapter_id, versions.get(adapter_id)), (0, 0))
            if n:
                acc = (correct or 0) / n
                families["live_accuracy"].add_metric([adapter_id], acc)
                families["feedback_items"].add_metric([adapter_id], n)
                if served.get("val_accuracy") is not None:
                    families["live_gap"].add_metric([adapter_id], served["val_accuracy"] - acc)
        yield from families.values()


class GenerationMetrics:
    """The generation engine's reports (adapters/serving/decode.EngineMetrics) as Prometheus
    series."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def first_token(self, seconds: float) -> None:
        self.m.generation_ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.m.generation_itl.observe(seconds)

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.m.generation_prompt_tokens.inc(prompt_tokens)
        self.m.generation_tokens.inc(completion_tokens)

    def ended(self, reason: str) -> None:
        self.m.generation_ended.labels(reason).inc()

    def state(self, running: int, waiting: int, kv_tokens: int, kv_budget: int) -> None:
        self.m.generation_running.set(running)
        self.m.generation_waiting.set(waiting)
        self.m.generation_kv_usage.set(kv_tokens / kv_budget if kv_budget else 0.0)
