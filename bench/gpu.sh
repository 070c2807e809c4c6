#!/usr/bin/env bash
# GPU benchmark: gptserve's server with CUDA graphs on and off and its engine in-process
# (default settings: graphs on) vs Hugging Face `generate`, on a
# GPT-2-small-shaped random model in bf16, at 1, 32, 256 and 1,024 concurrent streams of 128 new
# tokens: tokens/s, TTFT and inter-token latency, plus the GPU's measured bf16 matmul FLOP/s and
# memory read bandwidth; then a GPT-2-XL-shaped random model (48 x 1600, --shape xl) at 1 and 256
# streams, server and in-process, with the fraction of the measured read bandwidth a stream uses
# (the HBM bound). The measuring is bench/peers.py's (--device cuda --dtype bfloat16). Last,
# bench/prefix.py: prefix reuse on vs off (shared system prompt, n siblings, no reuse).
#
# One command, from anywhere in a checkout on a CUDA machine (about 5 minutes once installed):
#     bash bench/gpu.sh
# Results: $OUT/gpu.txt (the table), $OUT/gpu.json (every figure), $OUT/server-logs.tar.gz,
# $OUT/nvidia-smi.csv; $WORKDIR/results/ when OUT is unset.
# Environment knobs: ROUNDS (2), STREAMS (1,32,256,1024), XL_STREAMS (1,256; empty: skip the XL
# rows), PREFIX_REQUESTS (256 concurrent shared-prefix requests for bench/prefix.py; empty: skip
# it), NEW_TOKENS (128), PYTHON (python3),
# INSTALL (auto: only when an import fails | yes | no), WORKDIR (/tmp/gptserve-peers-gpu),
# DEVICE (cuda; cpu runs the same steps on the CPU, a dry run of this script), DTYPE (bfloat16;
# float32 for a CPU dry run where bf16 has no fast kernels: there a bf16 matmul takes minutes).
# Offline machines: TIKTOKEN_CACHE_DIR must hold GPT-2's BPE ranks (tiktoken's cache).
set -euo pipefail

# gptserve's server switch for CUDA-graph decode, followed by "on" or "off": adjust it here
# when the engine's flag lands under another name
CUDA_GRAPHS_FLAG="--cuda-graphs"
TORCH_VERSION="2.13.0"

ROUNDS="${ROUNDS:-2}"
STREAMS="${STREAMS:-1,32,256,1024}"
XL_STREAMS="${XL_STREAMS-1,256}"
PREFIX_REQUESTS="${PREFIX_REQUESTS-256}"
NEW_TOKENS="${NEW_TOKENS:-128}"
PYTHON="${PYTHON:-python3}"
INSTALL="${INSTALL:-auto}"
WORKDIR="${WORKDIR:-/tmp/gptserve-peers-gpu}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bfloat16}"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$WORKDIR/results}"
mkdir -p "$out" "$WORKDIR"
cd "$repo"

if [ "$DEVICE" = cuda ] &&
    ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv"
then
    echo "gpu.sh: no NVIDIA GPU answers here (nvidia-smi failed)" >&2
    exit 1
fi

deps_ok() {
    DEVICE="$DEVICE" "$PYTHON" -c 'import os, torch, transformers, httpx, fastapi, uvicorn, tiktoken
assert os.environ["DEVICE"] == "cpu" or torch.cuda.is_available(), "torch sees no CUDA device"' \
        2>/dev/null
}

if [ "$INSTALL" = yes ] || { [ "$INSTALL" = auto ] && ! deps_ok; }; then
    # a venv of our own that still sees a CUDA torch already installed on the machine
    "$PYTHON" -m venv --system-site-packages "$WORKDIR/venv"
    PYTHON="$WORKDIR/venv/bin/python"
    if [ -f requirements/dev.txt ]; then
        "$PYTHON" -m pip install "torch==$TORCH_VERSION" -r requirements/dev.txt -e .
    else
        "$PYTHON" -m pip install "torch==$TORCH_VERSION" -e ".[dev]"
    fi
fi
if ! deps_ok; then
    echo "gpu.sh: $PYTHON lacks torch with CUDA, transformers, httpx or the server's packages" >&2
    exit 1
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

servers=()
server_help="$("$PYTHON" -m service --help)"
if grep -q -- "$CUDA_GRAPHS_FLAG" <<<"$server_help"; then
    servers+=(--systems hf,gptserve-inproc
              --gptserve-variant "graphs-on=$CUDA_GRAPHS_FLAG on"
              --gptserve-variant "graphs-off=$CUDA_GRAPHS_FLAG off")
else
    echo "gptserve has no $CUDA_GRAPHS_FLAG flag yet: measuring its default server only"
    servers+=(--systems "gptserve,gptserve-inproc,hf")
fi

status=0
"$PYTHON" bench/peers.py --device "$DEVICE" --dtype "$DTYPE" "${servers[@]}" \
    --workloads "$STREAMS" --rounds "$ROUNDS" --new-tokens "$NEW_TOKENS" \
    --workdir "$WORKDIR" --json "$out/gpu.json" 2>&1 | tee "$out/gpu.txt" || status=$?
if [ -n "$XL_STREAMS" ]; then  # GPT-2-XL shape: the rows that read ~3 GB of weights per step
    "$PYTHON" bench/peers.py --device "$DEVICE" --dtype "$DTYPE" --shape xl \
        --systems gptserve,gptserve-inproc --workloads "$XL_STREAMS" --rounds 1 \
        --new-tokens "$NEW_TOKENS" --workdir "$WORKDIR" --json "$out/gpu-xl.json" 2>&1 |
        tee "$out/gpu-xl.txt" || status=$?
fi
if [ -n "$PREFIX_REQUESTS" ]; then  # prefix reuse on vs off (docs/BENCHMARKS.md, "Prefix reuse")
    "$PYTHON" bench/prefix.py --device "$DEVICE" --dtype "$DTYPE" --requests "$PREFIX_REQUESTS" \
        2>&1 | tee "$out/gpu-prefix.txt" || status=$?
fi
if [ -d "$WORKDIR/logs" ]; then
    tar -czf "$out/server-logs.tar.gz" -C "$WORKDIR" logs
fi
exit "$status"
