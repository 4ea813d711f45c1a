"""Start-up cost of the frozen base model host.

Measures, in one process, median seconds over N runs of:
  baseline: transformers' AutoTokenizer + AutoModel.from_pretrained + one forward (by hand)
  loradock: BaseModel.load + warm_up (frozen, placed, pooled, two-text warm-up)
and, unless --no-server, seconds from `loradock serve` process start to /readyz = 200.

    python bench/startup.py [--runs 5] [--base-model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loradock.adapters.core.base import BaseModel, default_base_model_path


def by_hand(path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.inference_mode():
        model(**tok(["loradock warm-up"], return_tensors="pt"))


def loradock(path: Path) -> None:
    BaseModel.load(path, device="auto").warm_up()


def timed(fn, path: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def server_ready_seconds(runs: int) -> float:
    from tests.server import ServerProcess

    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            server = ServerProcess(Path(d) / "data").start()
            times.append(time.perf_counter() - t0)
            server.stop()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args()
    path = args.base_model or default_base_model_path()
    by_hand(path)  # warm the page cache and imports for both
    base = timed(by_hand, path, args.runs)
    ours = timed(loradock, path, args.runs)
    print(f"base model: {path}")
    print(f"baseline load+forward   median {base:.3f}s over {args.runs} runs")
    print(f"loradock load+warm-up   median {ours:.3f}s  ratio {ours / base:.2f}x baseline")
    if not args.no_server:
        ready = server_ready_seconds(max(1, args.runs // 2))
        print(f"loradock serve -> /readyz median {ready:.2f}s (process start, imports, DB, model)")


if __name__ == "__main__":
    main()
