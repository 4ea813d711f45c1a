"""Overload on loopback: what a surge of 4x the sustainable predict rate does to a real server.

1. Start `loradock serve` (default model) with LORADOCK_MAX_QUEUE_WAIT_MS=--queue-wait-ms, train
   one adapter.
2. Sustainable rate: --clients closed-loop clients for --seconds (16 texts a request).
3. Surge: open loop at --factor x that rate for --surge-seconds.
4. Recovery: the closed loop again.
Prints, per phase, accepted requests/s, 429s, errors, p50/p99 latency of accepted requests and
/healthz results, and the ratios surge-goodput/sustainable and recovery/sustainable. --runs N
repeats 2-4 and prints the median of each ratio.

    .venv/bin/python bench/overload.py [--surge-seconds 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.loadgen import one_adapter_load
from tests.server import ServerProcess


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--surge-seconds", type=float, default=30)
    p.add_argument("--factor", type=float, default=4)
    p.add_argument("--queue-wait-ms", type=float, default=1000)
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        with ServerProcess(data, max_queue_wait_ms=args.queue_wait_ms) as server:
            load = one_adapter_load(server.url, server.admin_key)
            goodput, recovery = [], []
            for run in range(args.runs):
                before = asyncio.run(load.closed_loop(args.clients, args.seconds))
                rate = before.ok_per_second
                surge = asyncio.run(load.open_loop(args.factor * rate, args.surge_seconds))
                after = asyncio.run(load.closed_loop(args.clients, args.seconds))
                print(f"run {run + 1}: sustainable {rate:.2f} req/s x {len(load.texts)} texts")
                for name, phase in (("before", before), ("surge", surge), ("after", after)):
                    print(f"  {name:7s} {phase.summary()}")
                goodput.append(surge.ok_per_second / rate)
                recovery.append(after.ok_per_second / rate)
            print(
                f"median over {args.runs} runs: surge goodput/sustainable "
                f"{statistics.median(goodput):.3f}, recovery/sustainable "
                f"{statistics.median(recovery):.3f}"
            )


if __name__ == "__main__":
    main()
