"""The peak FLOP/s that MFU is measured against.

Without ``--peak-flops`` the peak is *measured*: the best of a few square matmuls in the run's
dtype on the run's device. On a CPU there is no datasheet number that applies to a shared,
thread-limited machine, so a measured matmul peak is the honest denominator; on a GPU pass the
datasheet figure (e.g. 989e12 for an H100's dense bf16) to get the conventional MFU.
"""

from __future__ import annotations

import time

import torch


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5
) -> float:
    """Best observed FLOP/s of an (n x n) @ (n x n) matmul (2·n³ FLOPs each).

    n defaults to 2048 on CPU (smaller matmuls under-report the peak: 512 -> 40, 1024 -> 150,
    2048 -> 400 GFLOP/s on the 2-core Xeon this was written on) and 8192 on a GPU.
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
