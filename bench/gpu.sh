#!/usr/bin/env bash
# The GPU bench (issue 17): one script, sized to finish in under 8 minutes on one H200.
#
#   bash bench/gpu.sh            on a machine with CUDA
#   bash bench/gpu.sh --dry-run  the same steps on this CPU with small sizes (about 10 minutes on
#                                2 cores): shows that every step would run; its numbers mean nothing
#
# Steps (each under its own time limit; one failing does not stop the others):
#   1. the tests marked `gpu` (tests/integration/test_gpu.py: a real server on the device, adapters
#      trained there and served in mixed batches, a causal LM answering the real openai client; and
#      the CUDA unit tests);
#   2. bench/serving.py: a batch of 256 rows mixing 32 and then 128 distinct adapters against the
#      bare base forward (goal >= 0.95x), and hot load with 1, 100 and 1000 resident (goal 1 ms);
#   3. bench/train.py: a short training (510 fortunes texts, 17 classes, seed 0, defaults);
#   4. bench/generate_speed.py (8 concurrent requests against transformers `generate`, bf16 and
#      float32, scheduler overhead per step) and bench/decode.py (32 requests, many adapters).
# Logs and a summary go to $OUT (the device tool's folder) or bench/gpu-results/.
#
# On a machine without network (this workplace's device machine), run `bash bench/gpu_prepare.sh`
# here first and carry .gpu/: the packages that machine lacks are installed from .gpu/wheels into
# /tmp/site, loradock itself from this checkout, the benches read the models and data in .gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
RESULTS=${OUT:-$ROOT/bench/gpu-results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
PY=python3
[ -x .venv/bin/python ] && PY=$ROOT/.venv/bin/python

if [ -d .gpu/wheels ] && ! "$PY" -c "import fastapi, loradock.service" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .gpu/wheels/*.whl || exit 1
    # loradock from this checkout, without its pins: the machine's own (CUDA) torch stays
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --target /tmp/site . || exit 1
    export PYTHONPATH=/tmp/site
fi
if [ -f .gpu/bundle.tar.gz ]; then
    mkdir -p /tmp/gpu-bundle /tmp/loradock-bench && tar -C /tmp/gpu-bundle -xzf .gpu/bundle.tar.gz
    export LORADOCK_BENCH_ENCODER=$ROOT/.gpu/models/encoder
    export LORADOCK_BENCH_CACHE=/tmp/loradock-bench LORADOCK_BENCH_FORTUNES=/tmp/gpu-bundle/data/fortunes
    cp /tmp/gpu-bundle/data/*.json /tmp/loradock-bench/
    # SmolLM2-135M-Instruct's shapes with random weights: the same work per token as the real one
    "$PY" - <<'EOF' || exit 1
from pathlib import Path
import shutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM
skel, out = Path("/tmp/gpu-bundle/causal-lm-skeleton"), Path("/tmp/causal-lm")
if not (out / "config.json").exists():
    shutil.copytree(skel, out, dirs_exist_ok=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(skel)).save_pretrained(out)
EOF
    export LORADOCK_BENCH_CAUSAL_LM=/tmp/causal-lm
fi
export LORADOCK_TEST_ENCODER=${LORADOCK_BENCH_ENCODER:-}
[ -z "$LORADOCK_TEST_ENCODER" ] && unset LORADOCK_TEST_ENCODER
[ -n "${LORADOCK_BENCH_CAUSAL_LM:-}" ] && export LORADOCK_TEST_CAUSAL_LM=$LORADOCK_BENCH_CAUSAL_LM

if [ $DRY = 1 ]; then
    export LORADOCK_TEST_DEVICE=cpu
    SERVING="--rows 32 --adapters 8 32 --runs 3 --counts 1 10 --samples 3"
    TRAIN=(--seeds 0 --no-plain --hp '{"epochs": 1}')
    SPEED="--requests 4 --tokens 8 --repeats 1"
    DECODE="--requests 8 --tokens 8 --repeats 1 --peft-requests 2"
    LIMITS=(420 120 120 120 240)
else
    SERVING="--rows 256 --adapters 32 128 --runs 20 --counts 1 100 1000 --samples 20"
    TRAIN=(--seeds 0 --no-plain)
    SPEED="--requests 8 --tokens 64 --repeats 3"
    DECODE="--requests 32 --tokens 48 --repeats 3"
    LIMITS=(200 60 60 60 90)
fi

SUMMARY=$RESULTS/summary.txt
: >"$SUMMARY"
step() {  # step NAME LIMIT COMMAND...: run under a time limit, log to $RESULTS/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name: $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - t0)) (limit $limit)" | tee -a "$SUMMARY"
}

{
    echo "dry-run: $DRY"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
} | tee -a "$SUMMARY"

step tests "${LIMITS[0]}" "$PY" -m pytest -m gpu -n 0 -p no:cacheprovider -q \
    tests/integration/test_gpu.py tests/adapters/test_device.py tests/adapters/test_base.py
# shellcheck disable=SC2086  # the size options are words on purpose
step serving "${LIMITS[1]}" "$PY" bench/serving.py --dtype auto --parts mixed load --no-peft $SERVING
step train "${LIMITS[2]}" "$PY" bench/train.py "${TRAIN[@]}"
# shellcheck disable=SC2086
step generate_speed "${LIMITS[3]}" "$PY" bench/generate_speed.py $SPEED
# shellcheck disable=SC2086
step decode "${LIMITS[4]}" "$PY" bench/decode.py $DECODE

echo "=== summary ($SUMMARY)"
cat "$SUMMARY"
! grep -q "rc=[1-9]" "$SUMMARY"
