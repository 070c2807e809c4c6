"""This machine's limits, measured in the same run as the systems: matmul FLOP/s and memory read
bandwidth, with the same thread count (CPU) or on the same device (CUDA), best of a few tries.

They bound decoding: one stream reads every weight once per token (bandwidth-bound), a large
batch does 2 FLOPs per parameter per token (compute-bound).
"""

from __future__ import annotations

import time
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


def measure(device: str = "cpu", dtype: str = "float32", reps: int = 5) -> Limits:
    import torch

    n = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    flops = 2 * n**3 / _best(lambda: torch.mm(a, b), device, reps)
    # 1 GiB (CPU) / 4 GiB (GPU) of fp32, summed: one read of every byte
    x = torch.ones((1 << 28) if device == "cpu" else (1 << 30), device=device)
    read = x.numel() * x.element_size() / _best(x.sum, device, reps)
    return Limits(flops, read)


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
