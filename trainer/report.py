"""What a run reports while it trains: the start-up banner, the step bar and its clock, per-step
and eval records (``log.jsonl``, TensorBoard, W&B) and the loss curve.

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs follow PaLM's appendix B (6N + 12·L·H·Q·T
per token, ``GPT.estimate_flops_per_token``); the peak is ``trainer/flops.py``'s fixed figure for
the device (or ``--peak-flops``), so MFU compares across runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import TrainSpec
from trainer.distributed import DistContext, all_mean
from trainer.flops import measure_matmul_flops, peak_flops
from trainer.metrics import EvalRecord, MetricsLog, StepRecord
from trainer.progress import ProgressBar, TrainClock
from trainer.sinks import MetricSinks


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step, as tensors on the device: reading them (``.item()``) syncs a GPU, so
    they are read only every ``log_interval`` steps."""

    loss: torch.Tensor  # mean over the step's micro-batches
    grad_norm: torch.Tensor  # global norm before clipping
    lr: float  # the learning rate the step used


@dataclass(frozen=True)
class RunShape:
    """The facts about a run that its reports quote."""

    num_params: int
    tokens_per_step: int  # all ranks together
    flops_per_token: int
    device: torch.device
    dtype: torch.dtype


class RunReport:
    """Owns the run's reporting: the clock that times training alone, the step bar, the metrics
    log and sinks. Every rank has one (the per-step loss is averaged across ranks, a collective);
    only rank 0 prints or writes."""

    def __init__(
        self,
        spec: TrainSpec,
        run_dir: Path,
        log: MetricsLog,
        shape: RunShape,
        ctx: DistContext,
        *,
        start_step: int,
        progress: bool,
    ) -> None:
        self.spec, self.log, self.shape, self.ctx = spec, log, shape, ctx
        self.peak = peak_flops(shape.device, shape.dtype, spec.loop.peak_flops)
        self.sinks = MetricSinks(spec, run_dir, start_step) if ctx.is_main else None
        self.clock = TrainClock()
        self.bar = ProgressBar(start_step, spec.loop.max_iters, self.clock, progress)
        self.start_step = start_step
        self._logged_at = (0, 0.0)  # (clock.steps, clock.seconds) at the last step record

    def banner(self) -> None:
        """Model, device, steps, MFU's peak with this machine's measured matmul beside it."""
        if not self.ctx.is_main:
            return
        shape, loop = self.shape, self.spec.loop
        measured = ""
        if loop.peak_flops is None:  # the table's figure: show what this device does beside it
            flops = measure_matmul_flops(shape.device, shape.dtype)
            measured = f", measured matmul here {_tflops(flops)}"
        say(
            f"model: {shape.num_params / 1e6:.2f}M params, {shape.tokens_per_step:,} tokens/step, "
            f"{shape.device} {str(shape.dtype).removeprefix('torch.')}, "
            f"steps {self.start_step} -> {loop.max_iters}; "
            f"MFU peak {_tflops(self.peak.flops)} per device ({self.peak.source}){measured}"
        )
        say(f"metrics every {self.spec.log.log_interval} steps: {self.sinks.describe()}")
        if self.start_step >= loop.max_iters:
            say(
                f"the run is already at step {self.start_step} of {loop.max_iters}: nothing to "
                "train; raise --max-iters to continue it"
            )

    def step_done(
        self, step: int, outcome: StepOutcome, tokens_seen: int, elapsed_s: float
    ) -> None:
        """After each optimizer step: advance the bar; every ``log_interval`` steps, a record."""
        self.clock.lap()
        self.bar.step()
        if step % self.spec.log.log_interval != 0:
            return
        loss = all_mean(outcome.loss.item(), self.ctx, self.shape.device)  # a GPU sync
        steps = self.clock.steps - self._logged_at[0]
        seconds = self.clock.seconds - self._logged_at[1]
        self._logged_at = (self.clock.steps, self.clock.seconds)
        if not self.ctx.is_main:
            return
        tokens_per_s = mfu = None
        if steps > 0:  # else only the warm-up step ran since the last record: not timed
            tokens_per_s = round(self.shape.tokens_per_step * steps / max(seconds, 1e-9), 1)
            peak = self.peak.flops * self.ctx.world_size
            mfu = round(tokens_per_s * self.shape.flops_per_token / peak, 6)
        record = StepRecord(
            step,
            round(loss, 6),
            outcome.lr,
            round(outcome.grad_norm.item(), 6),
            tokens_per_s,
            mfu,
            tokens_seen,
            round(elapsed_s, 2),
        )
        self.log.append(record)
        self.sinks.step(record)
        self.bar.show(loss, tokens_per_s, mfu)

    def eval_done(self, record: EvalRecord, improved: bool) -> None:
        """Rank 0: the eval record everywhere, the loss curve redrawn, a line above the bar."""
        self.log.append(record)
        self.log.plot()
        self.sinks.eval(record)
        self.sinks.flush()
        self.bar.write(
            f"step {record.step}: train loss {record.train_loss:.4f}, "
            f"val loss {record.val_loss:.4f}{' (best)' if improved else ''}"
        )

    def resume_clock(self) -> None:
        """After work that is not training (an eval, a checkpoint): its time is not counted."""
        self.clock.restart()

    def close(self) -> None:
        self.bar.close()
        if self.sinks is not None:
            self.sinks.close()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tflops(flops: float) -> str:
    return f"{flops / 1e12:.3g} TFLOP/s"
