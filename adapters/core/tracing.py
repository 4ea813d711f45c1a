"""OpenTelemetry spans for the model code (forward passes, training steps).

The OpenTelemetry API is a light dependency that does nothing until a tracer provider is
installed: `loradock serve` installs one only when tracing is configured (setting
LORADOCK_TRACING, see loradock.service.observability), so by default every span here is a no-op
costing about a microsecond. Library users can install their own provider and get the same spans.
"""

from __future__ import annotations

from opentelemetry import trace

# Instrumentation scope: the package name, as OpenTelemetry's conventions ask.
tracer = trace.get_tracer("loradock")
