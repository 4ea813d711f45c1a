"""Prometheus metrics as an object with its own registry (never the global one)."""

from __future__ import annotations

import platform
import time
from importlib.metadata import version

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

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


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
