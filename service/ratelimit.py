"""Per-tenant token buckets for predict: one customer cannot starve the others."""

from __future__ import annotations

import math
import threading
import time

from loradock.service.errors import TooManyRequests


class TenantRateLimiter:
    """`rate` requests per second per tenant on average, bursts up to `burst`. rate 0 = off."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, tenant_id: str, cost: float = 1.0) -> None:
        """Spend `cost` tokens or raise TooManyRequests saying when to retry."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(tenant_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < cost:
                self._buckets[tenant_id] = (tokens, now)
                wait = (cost - tokens) / self.rate
                raise TooManyRequests(
                    f"this tenant's predict rate limit is {self.rate:g} requests/s with bursts of "
                    f"{self.burst:g} (settings LORADOCK_PREDICT_RATE_PER_TENANT, "
                    "LORADOCK_PREDICT_BURST); retry shortly",
                    retry_after=max(1, math.ceil(wait)),
                )
            self._buckets[tenant_id] = (tokens - cost, now)
