"""Training throughput: our ``Trainer.train_step`` vs a plain loop written the nanoGPT way.

Both train the same GPT (same shape, batch, dtype, seed) on the same prepared data, in one process,
interleaved in chunks so that a busy machine slows both alike. Prints tokens/s, MFU and the ratio.

    python bench/train_throughput.py --preset cpu-small --threads 2
    python bench/train_throughput.py --preset shakespeare-char --device cuda   # on a GPU

MFU = tokens/s x FLOPs/token / peak, FLOPs/token by PaLM's 6N + 12·L·H·Q·T
(``GPT.estimate_flops_per_token``); the peak is measured (best 2048² fp32 matmul on CPU) unless
``--peak-flops`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.gpt import GPT
from trainer.config import PRESETS, build_train_spec
from trainer.data import TokenData, prepare
from trainer.distributed import DistContext
from trainer.flops import measure_matmul_flops
from trainer.loop import Trainer, padded_vocab_size, resolve_dtype


class NanoGPTLoop:
    """nanoGPT's train.py inner loop, transcribed: get_batch with two np->torch stacks, AdamW with
    nanoGPT's decay groups, autocast, GradScaler, clip, ``zero_grad(set_to_none=True)``."""

    def __init__(self, spec, data: TokenData, device: torch.device, dtype: torch.dtype) -> None:
        torch.manual_seed(spec.loop.seed)
        self.model = GPT(spec.model.gpt_config(padded_vocab_size(data.vocab_size))).to(device)
        self.spec, self.data, self.device = spec, data.splits["train"], device
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for p in params if p.dim() >= 2],
                "weight_decay": spec.optim.weight_decay,
            },
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = {"fused": True} if device.type == "cuda" else {}
        betas = (spec.optim.beta1, spec.optim.beta2)
        self.optimizer = torch.optim.AdamW(
            groups, lr=spec.optim.learning_rate, betas=betas, **fused
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.ctx = (
            contextlib.nullcontext()
            if dtype == torch.float32
            else torch.autocast(device.type, dtype=dtype)
        )
        self.X, self.Y = self.get_batch()

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        T, B, data = self.spec.model.block_size, self.spec.loop.batch_size, self.data
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(
                self.device, non_blocking=True
            )
        return x, y

    def train_step(self) -> float:
        accum = self.spec.loop.grad_accum_steps
        for _ in range(accum):
            with self.ctx:
                _, loss = self.model(self.X, self.Y)
                loss = loss / accum
            self.X, self.Y = self.get_batch()  # prefetch while the GPU works (nanoGPT)
            self.scaler.scale(loss).backward()
        if self.spec.optim.grad_clip != 0.0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item() * accum


def time_steps(step, n: int, device: torch.device) -> float:
    """Seconds per step over ``n`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument(
        "--input",
        default=os.environ.get("GPTSERVE_TEST_CORPUS"),
        help="corpus text (default: $GPTSERVE_TEST_CORPUS)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: the preset's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="steps per timed chunk")
    p.add_argument("--rounds", type=int, default=6, help="interleaved chunks per loop")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-flops", type=float, default=None)
    args = p.parse_args(argv)
    if not args.input:
        p.error("--input (or GPTSERVE_TEST_CORPUS) is required")
    torch.set_num_threads(args.threads)
    spec = build_train_spec(args.preset, device=args.device, dtype=args.dtype)
    device = torch.device(args.device)
    dtype = resolve_dtype(spec.loop.dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(args.input, "char", Path(tmp) / "data")
        data = TokenData.open(Path(tmp) / "data")
        ours = Trainer(
            spec,
            data,
            Path(tmp) / "run",
            resume=False,
            ctx=DistContext(),
            device=device,
            progress=False,
        )
        theirs = NanoGPTLoop(spec, data, device, dtype)
        for loop in (ours, theirs):
            time_steps(loop.train_step, args.warmup, device)
        times: dict[str, list[float]] = {"ours": [], "nanogpt": []}
        for r in range(
            args.rounds
        ):  # alternate who goes first, so neither always gets a warm cache
            order = [("ours", ours), ("nanogpt", theirs)][:: 1 if r % 2 == 0 else -1]
            for name, loop in order:
                times[name].append(time_steps(loop.train_step, args.steps, device))
    peak = args.peak_flops or measure_matmul_flops(device, dtype)
    tokens_per_step = spec.loop.batch_size * spec.loop.grad_accum_steps * spec.model.block_size
    flops_per_token = ours.raw_model.estimate_flops_per_token()
    print(
        f"preset {args.preset}: {ours.raw_model.num_params() / 1e6:.2f}M params, batch "
        f"{spec.loop.batch_size}x{spec.model.block_size}, {device} {dtype}, {args.threads} "
        f"threads, {args.rounds} interleaved rounds of {args.steps} steps, peak "
        f"{peak / 1e9:.1f} GFLOP/s ({'given' if args.peak_flops else 'measured matmul'})"
    )
    rate = {}
    for name in ("ours", "nanogpt"):
        sec = statistics.median(times[name])
        rate[name] = tokens_per_step / sec
        mfu = rate[name] * flops_per_token / peak
        print(
            f"  {name:8s} {1000 * sec:8.1f} ms/step  {rate[name]:10,.0f} tokens/s  MFU {100 * mfu:5.1f}%"
        )
    print(f"ratio ours/nanogpt (median tokens/s): {rate['ours'] / rate['nanogpt']:.3f}")


if __name__ == "__main__":
    main()
