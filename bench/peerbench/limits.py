"""This machine's limits, measured in the same run as the systems: matmul FLOP/s and memory read
bandwidth, with the same thread count (CPU) or on the same device (CUDA), best of a few tries.

They bound decoding: one stream reads every weight once per token (bandwidth-bound), a large
batch does 2 FLOPs per parameter per token (compute-bound).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    flops: float  # matmul FLOP/s in the benchmark dtype
    read_bytes: float  # bytes/s reading a tensor far larger than the caches

    def bandwidth_fraction(self, weight_bytes: int, tokens_per_s: float) -> float:
        """Share of the read bandwidth one stream's decode uses (every weight read per token)."""
        return weight_bytes * tokens_per_s / self.read_bytes

    def flop_fraction(self, params: int, tokens_per_s: float) -> float:
        """Share of the matmul FLOP/s a batch's decode uses (2 FLOPs per parameter per token)."""
        return 2 * params * tokens_per_s / self.flops


def measure(device: str = "cpu", dtype: str = "float32", threads: int = 1,
            reps: int = 5) -> Limits:
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    flops = matmul_flops(device, dtype, reps)
    return Limits(flops, _cpu_read(threads, reps) if device == "cpu" else _gpu_read(reps))


def matmul_flops(device: str = "cpu", dtype: str = "float32", reps: int = 5) -> float:
    """Best FLOP/s of a square ``torch.mm`` (2048 on CPU, 8192 on CUDA), on the threads torch
    has now."""
    import torch

    n = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    return 2 * n**3 / _best(lambda: torch.mm(a, b), device, reps)


def _cpu_read(threads: int, reps: int) -> float:
    """1 GiB of fp32 reduced by numpy's ``max`` in ``threads`` threads (it releases the GIL):
    the fastest read of those tried on the 2-core VM (``torch.sum`` read slower)."""
    import numpy as np

    x = np.ones(1 << 28, dtype=np.float32)
    chunks = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:
        return x.nbytes / _best(lambda: list(pool.map(np.max, chunks)), "cpu", reps)


def _gpu_read(reps: int) -> float:
    """4 GiB of fp32 summed on the GPU: one read of every byte."""
    import torch

    x = torch.ones(1 << 30, device="cuda")
    return x.numel() * x.element_size() / _best(x.sum, "cuda", reps)


def _best(fn, device: str, reps: int) -> float:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best
