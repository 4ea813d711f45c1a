"""Load generators for predict on loopback: closed loop (what the server sustains) and open loop
(a fixed arrival rate whatever the server does, which is what overload looks like), with a
/healthz prober running alongside. Used by tests/integration/test_overload.py and bench/overload.py.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from tests.datasets import keyword_rows
from tests.integration.test_jobs_restart import wait_for

# 16 short texts a request: the model, not Python's HTTP handling on two shared cores, is the
# bottleneck, as with real traffic on a GPU; a 4x surge is then one the server can answer with 429s.
REQUEST_TEXTS = [
    f"{t} {i}"
    for i in range(4)
    for t in ("my card was charged twice", "I cannot log in", "where is my parcel", "hello there")
]

KEEPALIVE_EXPIRY_S = 2.0


@dataclass
class Phase:
    seconds: float
    ok_latencies: list[float] = field(default_factory=list)
    statuses: Counter[int | str] = field(default_factory=Counter)
    retry_after: list[int] = field(default_factory=list)
    health_failures: int = 0
    health_checks: int = 0
    health_worst: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses[200]

    @property
    def shed(self) -> int:
        return self.statuses[429]

    @property
    def errors(self) -> int:
        """Anything but 200 and 429 from the server: 5xx, other codes, transport errors."""
        return sum(n for s, n in self.statuses.items() if s not in (200, 429, "client_saturated"))

    @property
    def saturated(self) -> int:
        return self.statuses["client_saturated"]

    @property
    def ok_per_second(self) -> float:
        return self.ok / self.seconds

    def quantile(self, q: float) -> float:
        lat = sorted(self.ok_latencies)
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    def summary(self) -> dict[str, object]:
        return {
            "seconds": round(self.seconds, 1),
            "ok": self.ok,
            "shed_429": self.shed,
            "errors": self.errors,
            "statuses": dict(self.statuses),
            "ok_per_s": round(self.ok_per_second, 2),
            "p50_s": round(self.quantile(0.5), 3),
            "p99_s": round(self.quantile(0.99), 3),
            "median_retry_after": statistics.median(self.retry_after) if self.retry_after else None,
            "healthz": f"{self.health_checks - self.health_failures}/{self.health_checks} ok, "
            f"worst {self.health_worst:.3f}s",
        }


class Load:
    def __init__(self, url: str, key: str, adapter: str, texts: list[str]) -> None:
        self.url, self.key, self.adapter, self.texts = url, key, adapter, texts

    async def _one(self, client: httpx.AsyncClient, phase: Phase) -> None:
        started = time.perf_counter()
        try:
            r = await client.post(
                f"/v1/adapters/{self.adapter}/predict", json={"inputs": self.texts}
            )
        except httpx.HTTPError as e:
            phase.statuses[type(e).__name__] += 1
            return
        phase.statuses[r.status_code] += 1
        if r.status_code == 200:
            phase.ok_latencies.append(time.perf_counter() - started)
        elif r.status_code == 429:
            phase.retry_after.append(int(r.headers.get("retry-after", "-1")))

    async def _probe_health(self, phase: Phase, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:
            while not stop.is_set():
                started = time.perf_counter()
                phase.health_checks += 1
                try:
                    ok = (await client.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                phase.health_failures += not ok
                phase.health_worst = max(phase.health_worst, time.perf_counter() - started)
                await asyncio.sleep(0.1)

    def _client(self, connections: int = 64) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=60.0,
            # A pooled connection is dropped before the server's keep-alive timeout (5 s by
            # default) can close it under a request being sent on it: httpx's own default expiry
            # is also 5 s, a race that shows up as a rare ReadError that is the client's doing.
            limits=httpx.Limits(
                max_connections=connections,
                max_keepalive_connections=connections,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
        )

    async def closed_loop(self, concurrency: int, seconds: float) -> Phase:
        """`concurrency` clients, each sending its next request when the last one returned."""
        phase = Phase(seconds)
        stop = asyncio.Event()
        deadline = time.perf_counter() + seconds

        async def worker(client: httpx.AsyncClient) -> None:
            while time.perf_counter() < deadline:
                await self._one(client, phase)

        async with self._client() as client:
            health = asyncio.create_task(self._probe_health(phase, stop))
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
            stop.set()
            await health
        return phase

    async def open_loop(self, rate: float, seconds: float, max_in_flight: int = 128) -> Phase:
        """Requests start at `rate` per second for `seconds`, however slowly they are answered.

        At most `max_in_flight` requests are outstanding (httpx's pool degrades badly with
        thousands); an arrival that finds them all busy is counted as `client_saturated`: the
        server was not answering (or shedding) fast enough, which a shedding server avoids.
        """
        phase = Phase(seconds)
        stop = asyncio.Event()
        in_flight = 0

        async def one(client: httpx.AsyncClient) -> None:
            nonlocal in_flight
            try:
                await self._one(client, phase)
            finally:
                in_flight -= 1

        async with self._client(max_in_flight) as client:
            health = asyncio.create_task(self._probe_health(phase, stop))
            tasks = []
            start = time.perf_counter()
            for i in range(int(rate * seconds)):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if in_flight >= max_in_flight:
                    phase.statuses["client_saturated"] += 1
                    continue
                in_flight += 1
                tasks.append(asyncio.create_task(one(client)))
            await asyncio.gather(*tasks)
            stop.set()
            await health
        return phase


def one_adapter_load(url: str, key: str, name: str = "t") -> Load:
    """Train one small adapter on the server at `url`, warm it up, and return a Load on it."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        body = {"name": name, "training_data": keyword_rows(20), "hyperparameters": {"epochs": 1}}
        job = c.post("/v1/adapters", json=body).json()["job"]["id"]
        done = wait_for(c, job, lambda j: j["status"] not in ("queued", "running"), timeout=600)
        if done["status"] != "succeeded":
            raise RuntimeError(f"job {job} {done['status']}: {done.get('error')}")
    load = Load(url, key, name, REQUEST_TEXTS)
    asyncio.run(load.closed_loop(4, 3))  # adapter resident, throughput measured
    return load
