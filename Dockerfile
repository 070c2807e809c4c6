# syntax=docker/dockerfile:1
# gptserve: the OpenAI-compatible server with the shipped Shakespeare weights baked in.
#
#   docker build -t gptserve .                                   # CPU PyTorch (default)
#   docker build -t gptserve:cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA PyTorch
#   docker run -p 8000:8000 gptserve
#   docker run -p 8000:8000 -v "$PWD/runs/exp1:/ckpt:ro" \
#       -e GPTSERVE_CHECKPOINT=/ckpt/best -e GPTSERVE_WATCH=1 gptserve
#
# Every server flag has a GPTSERVE_* twin (see `gptserve --help`); the image sets only the ones a
# container needs. TORCH_VARIANT picks the wheel index https://download.pytorch.org/whl/<variant>:
# `cpu` keeps the image small (the PyPI default wheel on Linux drags in ~3 GB of CUDA libraries),
# `cu126`/`cu128` bundle the CUDA runtime, so the base image needs no CUDA, only the NVIDIA
# container toolkit on the host (`docker run --gpus all`).
#
# This file is linted with hadolint in the test suite; it has not been built on the development
# machines (no Docker engine there).

ARG PYTHON_VERSION=3.11

# ---- build: a virtualenv holding torch, the dependencies and gptserve itself ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the variant's index, so the dependency resolver below finds it satisfied.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
# The runtime lock: the exact versions the test suite ran with (requirements/lock.sh writes it).
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY model ./model
COPY trainer ./trainer
COPY service ./service
# Every dependency is installed above at its locked version: --no-deps keeps it that way.
RUN pip install --no-deps .
# The one-row CPU kernel (model/cpu_gemv.py), built here so the runtime image needs no compiler:
# -mavx2 -mfma, never -march=native, so it runs on any x86-64 CPU with AVX2 and FMA (checked at
# load). A builder where it cannot be built (another architecture) leaves it out: the server then
# logs why and uses PyTorch's products.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV GPTSERVE_KERNEL_CACHE=/opt/venv/share/gptserve/kernels
RUN python -m model.cpu_gemv || echo "one-row CPU kernel not built; PyTorch's products will run"

# ---- runtime: the venv, the shipped weights, a non-root user ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="gptserve" \
      org.opencontainers.image.description="OpenAI-compatible server for nanoGPT / GPT-2 family models"
RUN groupadd --system --gid 10001 gptserve \
    && useradd --system --uid 10001 --gid gptserve --home-dir /app --no-create-home gptserve
COPY --from=build /opt/venv /opt/venv
COPY --chown=gptserve:gptserve weights /app/weights
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GPTSERVE_HOST=0.0.0.0 \
    GPTSERVE_PORT=8000 \
    GPTSERVE_CHECKPOINT=/app/weights/shakespeare-char \
    GPTSERVE_KERNEL_CACHE=/opt/venv/share/gptserve/kernels
USER 10001:10001
EXPOSE 8000
# Liveness only (the process answers); readiness (/ready) is for load balancers and Kubernetes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('GPTSERVE_PORT', '8000')}/health\", timeout=2)"]
ENTRYPOINT ["gptserve"]
