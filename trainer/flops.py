"""The peak FLOP/s that MFU is measured against: a fixed, documented figure per device and dtype.

MFU = achieved model FLOP/s / peak FLOP/s. The peak is a fixed number so that MFU compares across
runs and machines of a kind (nanoGPT divides by an A100's 312 TFLOP/s bf16 on every GPU). A matmul
peak measured on the run's own device is printed beside it once, at start-up, for context.

``PEAK_FLOPS`` is keyed by (device kind, dtype). GPU kinds are matched against the CUDA device
name; figures are NVIDIA's dense (no sparsity) tensor-core numbers from the datasheets, fp32 being
plain (non-TF32) fp32. A GPU not in the table uses the A100 row, nanoGPT's convention.

The CPU row is a nominal 1 TFLOP/s for every dtype: roughly one 16-core AVX-512 server socket's
fp32 FMA peak (16 cores x 2 FMA units x 16 lanes x 2 FLOPs x ~2 GHz). No datasheet figure fits
every CPU, so CPU MFU is comparable between runs, not an efficiency. For reference, the matmul
peak measured on this repository's 2-core development VM is in docs/BENCHMARKS.md ("Training
throughput").

``--peak-flops`` replaces the table's figure (per device, FLOP/s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

_FP32, _BF16, _FP16 = torch.float32, torch.bfloat16, torch.float16

PEAK_FLOPS: dict[tuple[str, torch.dtype], float] = {
    ("A100", _BF16): 312e12,
    ("A100", _FP16): 312e12,
    ("A100", _FP32): 19.5e12,
    ("H100", _BF16): 989e12,  # SXM
    ("H100", _FP16): 989e12,
    ("H100", _FP32): 67e12,
    ("H200", _BF16): 989e12,
    ("H200", _FP16): 989e12,
    ("H200", _FP32): 67e12,
    ("cpu", _BF16): 1e12,
    ("cpu", _FP16): 1e12,
    ("cpu", _FP32): 1e12,
}
DEFAULT_GPU = "A100"


@dataclass(frozen=True)
class Peak:
    """The FLOP/s per device MFU divides by, and where that figure came from."""

    flops: float
    source: str  # e.g. "table: H100 bfloat16" or "--peak-flops"


def peak_flops(device: torch.device, dtype: torch.dtype, given: float | None) -> Peak:
    """``given`` if set, else the table's figure for this device kind and dtype."""
    if given is not None:
        return Peak(given, "--peak-flops")
    kind = device_kind(device)
    dtype_name = str(dtype).removeprefix("torch.")
    if (kind, dtype) in PEAK_FLOPS:
        return Peak(PEAK_FLOPS[kind, dtype], f"table: {kind} {dtype_name}")
    return Peak(
        PEAK_FLOPS[DEFAULT_GPU, dtype], f"table: {DEFAULT_GPU} {dtype_name}, for an unlisted GPU"
    )


def device_kind(device: torch.device) -> str:
    """``cpu``, or the table's GPU name found in the CUDA device's name (else the device name)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((kind for kind, _ in PEAK_FLOPS if kind in name), name)


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5
) -> float:
    """Best observed FLOP/s of an (n x n) @ (n x n) matmul (2·n³ FLOPs each).

    n defaults to 2048 on CPU (smaller matmuls under-report a CPU's peak several-fold) and 8192
    on a GPU.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
