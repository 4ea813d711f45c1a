"""Drift detection on real text, and what the monitor costs serving.

In one process, on the default model (the app in-process, through its HTTP routes):
1. Train an adapter on 5 fortunes categories (40 texts each + 10 for validation).
2. Send 300 unseen texts of the same 5 categories: drift scores should stay under threshold.
3. Send 300 texts of 5 other categories: the adapter should be flagged within the window.
4. Monitor overhead: the same predict stream with the monitor on and off, alternating blocks;
   throughput ratio of the medians.

    .venv/bin/python bench/monitoring.py [--blocks 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient
from fortunes import load_categories

from loradock.service.app import create_app
from loradock.service.settings import Settings

TRAINED = ["computers", "politics", "science", "work", "definitions"]
OTHER = ["people", "cookie", "zippy", "men-women", "songs-poems"]


def summary(drift: dict) -> str:
    sig = drift.get("signals", {})
    parts = [
        f"{k} PSI {v['psi_raw']:.3f} (noise {v['psi_noise']:.3f}, excess {v['psi']:.3f})"
        for k, v in sig.items()
        if "psi" in v
    ]
    if "embedding" in sig:
        parts.append(
            f"embedding MMD^2 {sig['embedding']['mmd2']:.4f} p={sig['embedding']['p_value']:.3f}"
        )
    return f"drifting={drift.get('drifting')} ({', '.join(parts)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--requests", type=int, default=20)
    args = p.parse_args()
    cats = load_categories()
    rng = random.Random(0)
    for c in TRAINED + OTHER:
        rng.shuffle(cats[c])
    train = [{"text": t, "label": c} for c in TRAINED for t in cats[c][:40]]
    val = [{"text": t, "label": c} for c in TRAINED for t in cats[c][40:50]]
    same = [t for c in TRAINED for t in cats[c][50:110]]
    other = [t for c in OTHER for t in cats[c][:60]]
    rng.shuffle(same)
    rng.shuffle(other)
    with tempfile.TemporaryDirectory() as d:
        app = create_app(Settings(data_dir=Path(d) / "data", drift_min_count=100,
                                  drift_check_every=100, drift_window=300))  # fmt: skip
        with TestClient(app) as c:
            runtime = app.state.runtime
            runtime.wait_until_settled(120)
            c.headers["Authorization"] = (
                "Bearer " + runtime.settings.bootstrap_key_path.read_text().strip()
            )
            t0 = time.perf_counter()
            body = {"name": "quotes", "training_data": train, "validation_data": val}
            job = c.post("/v1/adapters", json=body).json()["job"]["id"]
            while c.get(f"/v1/jobs/{job}").json()["status"] in ("queued", "running"):
                time.sleep(0.5)
            version = c.get("/v1/adapters/quotes/versions/1").json()
            f1, winner = version["metrics"].get("val_macro_f1"), version["report"]["winner"]
            print(f"trained in {time.perf_counter() - t0:.0f}s: validation macro-F1 {f1}, {winner}")

            def send(texts: list[str]) -> dict:
                for i in range(0, len(texts), 10):
                    c.post("/v1/adapters/quotes/predict", json={"inputs": texts[i : i + 10]})
                return c.get("/v1/adapters/quotes/monitoring").json()

            report = send(same)
            print(f"300 unseen texts, same 5 categories: {summary(report['drift'])}")
            report = send(other)
            print(f"+300 texts of 5 other categories:   {summary(report['drift'])}")
            for flag in report["flags"]:
                print(f"  flag: {flag}")

            # Overfitting made visible: 8 texts per class, 15 epochs, early stopping off vs on.
            small = [{"text": t, "label": c} for c in TRAINED for t in cats[c][:8]]
            for name, stop in (("tiny-off", False), ("tiny-on", True)):
                hp = {"epochs": 15, "early_stopping": stop}
                body = {"name": name, "training_data": small, "validation_data": val,
                        "hyperparameters": hp}  # fmt: skip
                job = c.post("/v1/adapters", json=body).json()["job"]["id"]
                while c.get(f"/v1/jobs/{job}").json()["status"] in ("queued", "running"):
                    time.sleep(0.5)
                rep = c.get(f"/v1/adapters/{name}/monitoring").json()
                o, m = rep["overfitting"], rep["training"]["metrics"]
                print(f"{name}: early stopping {'on' if stop else 'off'}: best epoch "
                      f"{o['best_epoch']} of {o['epochs_run']}, train loss {m.get('train_loss')}, "
                      f"validation loss {m.get('val_loss')}, gap {o['generalization_gap']}, "
                      f"verdict {o['verdict']!r}")  # fmt: skip
                for flag in rep["flags"]:
                    print(f"  flag: {flag}")

            texts = same + other
            serving = runtime.serving
            monitor = serving.monitor
            on, off = [], []
            for block in range(args.blocks):
                for enabled, sink in (
                    ((True, on), (False, off)) if block % 2 == 0 else ((False, off), (True, on))
                ):
                    serving.monitor = monitor if enabled else None
                    t = time.perf_counter()
                    for i in range(args.requests):
                        batch = [texts[(block * 97 + i * 16 + k) % len(texts)] for k in range(16)]
                        c.post("/v1/adapters/quotes/predict", json={"inputs": batch})
                    if enabled:
                        monitor.drain()  # the monitor's work counts against its arm
                    sink.append(args.requests * 16 / (time.perf_counter() - t))
            serving.monitor = monitor
            m_on, m_off = statistics.median(on), statistics.median(off)
            print(f"monitor overhead: {m_on:.1f} rows/s with the monitor, {m_off:.1f} without "
                  f"(median of {args.blocks} blocks of {args.requests} x 16 texts): "
                  f"ratio {m_on / m_off:.3f}, cost {100 * (1 - m_on / m_off):.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
