#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on a GPU machine that cannot reach the network (this workplace's
# device machine: Python 3.12 with CUDA torch, transformers, peft, prometheus-client, httpx, ...)
# into .gpu/ (git-ignored, at most ~60 MiB so it travels with the working tree):
#   .gpu/wheels/   the Python packages that machine lacks (cp312 manylinux wheels, no deps)
#   .gpu/models/encoder/        the default encoder (all-MiniLM-L6-v2), weights in bf16 (45 MB)
#   .gpu/bundle.tar.gz  causal-lm-skeleton/: SmolLM2-135M-Instruct's config and tokenizer, no
#                  weights (bench/gpu.sh makes random weights of the same shapes there: the speed
#                  is the same; the 270 MB of real weights do not fit the transfer); data/: the
#                  fortunes texts and the probablepeople names the benches read
# Run here, from the repository root, after `pip install -e '.[test]'` and the bench data
# (apt-get install fortunes; bench/realsets.py fetches probablepeople once):
#   bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/models .gpu/bundle/data

# Packages the device image lacks, at the versions this checkout is tested with.
pkgs=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
      annotated-types uvicorn sqlalchemy greenlet alembic mako python-multipart openai jiter distro
      sniffio)
installed=$("$PY" -m pip list --format=freeze 2>/dev/null | tr 'A-Z_' 'a-z-')
pins=()
for p in "${pkgs[@]}"; do
    pin=$(grep -m1 "^$p==" <<<"$installed" || true)
    if [ -n "$pin" ]; then pins+=("$pin"); else pins+=("$p"); fi  # not here: the newest
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .gpu/wheels "${pins[@]}"

"$PY" - <<'EOF'
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loradock.adapters.core.base import default_base_model_path
from loradock.adapters.core.presets import resolve_base_model

src = default_base_model_path()
dst = Path(".gpu/models/encoder")
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx",
                                                           "openvino", "*.onnx", "*.h5", "*.ot"))
weights = load_file(src / "model.safetensors")
save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, dst / "model.safetensors",
          metadata={"format": "pt"})
causal = resolve_base_model("smollm2-135m-instruct", Path.home() / ".cache" / "loradock-bench")
skel = Path(".gpu/bundle/causal-lm-skeleton")
shutil.copytree(causal.path, skel, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
EOF
mkdir .gpu/bundle/data/fortunes
find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.dat' -exec cp {} .gpu/bundle/data/fortunes/ \;
cp ~/.cache/loradock-bench/probablepeople-*.json .gpu/bundle/data/
tar -C .gpu/bundle -czf .gpu/bundle.tar.gz . && rm -rf .gpu/bundle
du -sh .gpu .gpu/*
