"""Scoring a big file: `loradock predict --file` (the client splits it into requests, 4 in flight)
against the same file as one server-side batch job (`--server-side`), on a real server.

1. Start `loradock serve` (default model) on loopback and train one adapter.
2. Write --rows real texts (Debian fortunes, cycled; `apt-get install fortunes`) as JSONL.
3. Run the real CLI both ways, each writing every prediction to a JSONL file, and time it.
Prints rows/s of each and the ratio batch job / client-side, and checks both files agree.

    .venv/bin/python bench/batch.py [--rows 100000] [--max-chars 160]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fortunes import load_categories

from tests.loadgen import one_adapter_load
from tests.server import ServerProcess


def run_cli(server: ServerProcess, *args: str) -> float:
    env = {**os.environ, "LORADOCK_URL": server.url, "LORADOCK_API_KEY": server.admin_key}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "loradock_client", *args, "-q"], env=env, capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--max-chars", type=int, default=160, help="longest quote used [160]")
    args = p.parse_args()
    quotes = [q for qs in load_categories(args.max_chars).values() for q in qs]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / "in.jsonl"
        with source.open("w") as f:
            for i in range(args.rows):
                f.write(json.dumps({"id": i, "text": quotes[i % len(quotes)][:2000]}) + "\n")
        size = source.stat().st_size
        settings = {"max_body_bytes": max(32 << 20, 2 * size)}
        with ServerProcess(root / "data", **settings) as server:
            one_adapter_load(server.url, server.admin_key)
            client_out, batch_out = root / "client.jsonl", root / "batch.jsonl"
            t_client = run_cli(server, "predict", "t", "-f", str(source), "-o", str(client_out))
            t_batch = run_cli(server, "predict", "t", "-f", str(source), "-o", str(batch_out),
                              "--server-side")  # fmt: skip
        a = [json.loads(x)["prediction"]["label"] for x in client_out.read_text().splitlines()]
        b = [json.loads(x)["prediction"]["label"] for x in batch_out.read_text().splitlines()]
    agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    print(f"{args.rows} rows ({size / 1e6:.1f} MB of JSONL, fortunes of <= {args.max_chars} chars)")
    print(f"client-side  predict --file: {t_client:7.1f} s  {args.rows / t_client:7.1f} rows/s")
    print(f"server-side  batch job:      {t_batch:7.1f} s  {args.rows / t_batch:7.1f} rows/s")
    print(f"ratio batch job / client-side: {t_client / t_batch:.2f}x; labels agree on {agree:.2%}")


if __name__ == "__main__":
    main()
