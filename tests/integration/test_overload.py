"""Overload on loopback with the real default model: 4x the sustainable predict rate for 20 s.

The server must shed with 429 + Retry-After (never 5xx, never a dropped connection), keep the
latency of the requests it accepts bounded by its queue-wait limit, keep /healthz answering, and
serve normally again right after. Bounded: LORADOCK_OVERLOAD_SECONDS (default 20).
bench/overload.py runs the same phases and prints the numbers recorded in bench/README.md.
"""

import asyncio
import os

import pytest

from tests.loadgen import one_adapter_load
from tests.server import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.exclusive]

SECONDS = float(os.environ.get("LORADOCK_OVERLOAD_SECONDS", "20"))
QUEUE_WAIT_MS = 1000
MAX_IN_FLIGHT = 128


def test_four_times_the_sustainable_rate_is_shed_not_queued(tmp_path):
    with ServerProcess(tmp_path / "data", max_queue_wait_ms=QUEUE_WAIT_MS) as server:
        load = one_adapter_load(server.url, server.admin_key)
        before = asyncio.run(load.closed_loop(8, 10))
        sustainable = before.ok_per_second
        over = asyncio.run(load.open_loop(4 * sustainable, SECONDS, MAX_IN_FLIGHT))
        after = asyncio.run(load.closed_loop(8, 10))
    print(f"\nsustainable {sustainable:.2f} req/s x {len(load.texts)} texts, offered 4x")
    for name, phase in (("before", before), ("overload 4x", over), ("after", after)):
        print(f"{name:12s} {phase.summary()}")
    print(f"recovery ratio {after.ok_per_second / sustainable:.3f}")

    assert before.errors == 0
    assert before.shed == 0  # the closed loop is what the server sustains without shedding
    # overload: excess is refused at once, with a reason to come back later
    assert over.errors == 0, over.statuses
    # the surge really reached the server (arrivals the client could not even send, because
    # MAX_IN_FLIGHT requests were outstanding, are reported as client_saturated, not counted here)
    assert (over.ok + over.shed) / SECONDS > 1.5 * sustainable, over.statuses
    assert over.shed > over.ok  # 4x offered: most of it must be shed, not queued
    assert all(r >= 1 for r in over.retry_after)
    # Accepted requests wait about the queue-wait limit, not in a backlog. The load generator
    # keeps at most MAX_IN_FLIGHT requests outstanding, so a server that queued instead of
    # shedding would make each accepted request wait about MAX_IN_FLIGHT / sustainable seconds
    # (~6 s at 22 req/s); the bound is relative to this run's own throughput, so a slow or busy
    # machine does not fail it (typical p50: 1.05 s alone, 2.4 s on a contended CI runner).
    # Absolute latencies and throughput ratios are measured in bench/overload.py, not asserted.
    assert over.quantile(0.5) < 0.75 * MAX_IN_FLIGHT / sustainable
    assert over.ok_per_second > 0.25 * sustainable  # it kept serving what it accepted
    # liveness never failed, and the server serves normally again as soon as the surge ends
    assert over.health_failures == 0
    assert before.health_failures == after.health_failures == 0
    assert after.errors == 0
    assert after.shed == 0
    assert after.ok_per_second > 0.4 * sustainable
