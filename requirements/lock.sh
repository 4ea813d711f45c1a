#!/usr/bin/env bash
# Regenerate requirements/image.lock, the hashed lock the Dockerfile installs with
# `pip install --require-hashes --no-deps`: every runtime dependency of loradock and its client
# (with the tracing extra), for CPython 3.12 on x86_64 Linux, except what overrides.txt leaves out.
# Needs uv (pip install uv) and PyPI; run it after changing a dependency in a pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml clients/python/pyproject.toml requirements/image-extra.in \
  --extra tracing \
  --override requirements/overrides.txt \
  --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
  --generate-hashes --no-header --annotation-style line \
  --output-file requirements/image.lock
