"""The training loop: one ``Trainer`` per run, driven by a ``TrainSpec`` and a prepared data folder.

Each optimizer step: ``grad_accum_steps`` micro-batches under autocast, gradient clipping, AdamW
with the warmup + cosine learning rate. Every ``log_interval`` steps: a per-step metrics record.
Every ``eval_interval`` steps (and at step 0 and the end): mean loss on fixed train/val batches,
an eval record, the loss curve, ``best/`` when val improved (step 0's eval included), and
``latest/`` (after step 0). On SIGINT / SIGTERM:
``latest/`` at the current step, then ``TrainingInterrupted``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from model.gpt import GPT
from trainer.checkpointing import Provenance, load_latest, save_best, save_latest
from trainer.config import TrainSpec
from trainer.data import BatchSampler, TokenData
from trainer.distributed import DistContext, all_mean, barrier, gather_objects
from trainer.errors import TrainerError, TrainingInterrupted
from trainer.interrupt import StopSignal
from trainer.metrics import EvalRecord, MetricsLog
from trainer.optim import learning_rate, make_optimizer
from trainer.progress import EvalProgress
from trainer.report import RunReport, RunShape, StepOutcome

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EVAL_SEED_OFFSET = 1  # eval batches come from their own generator: the same batches every eval


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports."""

    best_val_loss: float
    best_step: int
    final_step: int
    tokens_seen: int
    wall_s: float


def padded_vocab_size(vocab_size: int) -> int:
    """Round a large vocabulary up to a multiple of 64 for faster matmuls (nanoGPT: 50257->50304)."""
    return vocab_size if vocab_size <= 256 else -(-vocab_size // 64) * 64


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


class Trainer:
    """Owns one run: the model (DDP-wrapped under torchrun), optimizer, grad scaler, samplers, the
    step and token counters, and the run folder (``best/``, ``latest/``, ``log.jsonl``, PNG)."""

    def __init__(
        self,
        spec: TrainSpec,
        data: TokenData,
        run_dir: Path,
        *,
        resume: bool,
        ctx: DistContext,
        device: torch.device,
        progress: bool = True,
    ) -> None:
        data.check_block_size(spec.model.block_size)
        self.spec, self.data, self.run_dir, self.ctx, self.device = spec, data, run_dir, ctx, device
        self.progress = progress and ctx.is_main
        self.dtype = resolve_dtype(spec.loop.dtype, device)
        self.gpt_config = spec.model.gpt_config(padded_vocab_size(data.vocab_size))
        loop = spec.loop
        self.tokens_per_step = (
            loop.batch_size * loop.grad_accum_steps * spec.model.block_size * ctx.world_size
        )
        self.step, self.tokens_seen = 0, 0
        self.elapsed_before = 0.0  # wall seconds spent by the runs this one resumes
        self._started = time.perf_counter()
        self.best_val, self.best_step = math.inf, -1
        self.evaluated_step = -1  # the last step whose eval completed
        self.saved_step = -1  # the step latest/ holds
        self.log = MetricsLog(run_dir)
        self.sampler = BatchSampler(
            data.splits["train"],
            spec.model.block_size,
            loop.batch_size,
            loop.seed,
            ctx.rank,
            ctx.world_size,
        )

        torch.manual_seed(loop.seed)  # identical init on every rank
        self.raw_model = GPT(self.gpt_config)
        train_state = self._load_resume_state() if resume else None
        self.raw_model.to(device)
        self.optimizer = make_optimizer(self.raw_model, spec.optim, device.type)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        torch.manual_seed(loop.seed + ctx.rank)  # dropout differs across ranks
        if train_state is not None:
            self._restore(train_state)
        elif ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.log.start_fresh()
        self.model: torch.nn.Module = self.raw_model
        if loop.compile:
            self.model = torch.compile(self.model)
        if ctx.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)

    # --- resume --------------------------------------------------------------------------------
    def _load_resume_state(self) -> dict:
        model, state = load_latest(
            self.run_dir, self.data.tokenizer_spec, self.gpt_config.to_dict()
        )
        self.raw_model.load_state_dict(model.state_dict())
        return state

    def _restore(self, state: dict) -> None:
        rng = state["rng"]
        if len(rng) != self.ctx.world_size:
            raise TrainerError(
                f"--resume: the checkpoint was written by {len(rng)} processes, "
                f"this job has {self.ctx.world_size}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.restore(state["sampler"])
        torch.set_rng_state(rng[self.ctx.rank]["cpu"])
        if self.device.type == "cuda" and rng[self.ctx.rank].get("cuda") is not None:
            torch.cuda.set_rng_state(rng[self.ctx.rank]["cuda"], self.device)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.saved_step = self.step
        # absent from states written before these existed: such a state was saved after its eval
        self.evaluated_step = state.get("evaluated_step", self.step)
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.best_val, self.best_step = state["best_val"], state["best_step"]
        if self.ctx.is_main:
            self.log.resume_at(self.step)

    def _train_state(self) -> dict:
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self._elapsed(),
            "evaluated_step": self.evaluated_step,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state(),
            "rng": gather_objects(rng, self.ctx),  # every rank's dropout RNG
        }

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._started = time.perf_counter()
        shape = RunShape(
            self.raw_model.num_params(),
            self.tokens_per_step,
            self.raw_model.estimate_flops_per_token(),
            self.device,
            self.dtype,
        )
        report = RunReport(
            self.spec,
            self.run_dir,
            self.log,
            shape,
            self.ctx,
            start_step=self.step,
            progress=self.progress,
        )
        stop = StopSignal(self.ctx, self.device, check_every=self.spec.log.log_interval)
        try:
            with stop:
                report.banner()
                self._train(stop, report)
        finally:
            report.close()
        barrier(self.ctx)  # rank 0 may still be writing the last checkpoint
        return TrainResult(
            self.best_val, self.best_step, self.step, self.tokens_seen, self._elapsed()
        )

    def _train(self, stop: StopSignal, report: RunReport) -> None:
        if self._eval_due() and not self._evaluate_and_save(report, stop):
            self._stop(stop)
        while self.step < self.spec.loop.max_iters:
            if stop.requested(self.step):
                self._stop(stop)
            outcome = self.train_step()
            report.step_done(self.step, outcome, self.tokens_seen, self._elapsed())
            if self._eval_due():
                completed = self._evaluate_and_save(report, stop)
                report.resume_clock()
                if not completed:
                    self._stop(stop)

    def _eval_due(self) -> bool:
        at, loop = self.step, self.spec.loop
        if at == 0:
            due = loop.eval_at_start
        else:
            due = at % loop.eval_interval == 0 or at == loop.max_iters
        return due and self.evaluated_step != at

    def _stop(self, stop: StopSignal) -> None:
        """Save latest/ at this step (unless it already holds it) and raise TrainingInterrupted."""
        signum = stop.requested()
        if self.saved_step != self.step:
            state = self._train_state()  # a collective: every rank takes part
            if self.ctx.is_main:
                save_latest(self.run_dir, self.raw_model, *self._provenance(None), state)
            self.saved_step = self.step
        if self.ctx.is_main:
            self.log.plot()
        raise TrainingInterrupted(
            self.step, signum, self.run_dir / "latest", self.ctx.world_size, self.ctx.is_main
        )

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self) -> StepOutcome:
        """One optimizer step at this step's learning rate."""
        lr = learning_rate(self.step, self.spec.optim, self.spec.lr_decay_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.spec.loop.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.sampler.next_batch(self.device)
            # under DDP, all-reduce gradients only on the last micro-step (nanoGPT)
            sync = (
                self.model.no_sync()
                if self.ctx.enabled and micro < accum - 1
                else contextlib.nullcontext()
            )
            with sync, self._autocast():
                _, loss = self.model(x, y)
                loss = loss / accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)  # true gradients for the norm (a no-op unless fp16)
        clip = self.spec.optim.grad_clip if self.spec.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return StepOutcome(total, grad_norm.detach(), lr)

    @torch.no_grad()
    def evaluate(self, stop: StopSignal | None = None) -> dict[str, float] | None:
        """Mean loss over ``eval_iters`` batches per split: the same batches at every eval.

        None when ``stop`` asked to stop part-way.
        """
        self.raw_model.eval()
        loop = self.spec.loop
        progress = EvalProgress(self.step, len(self.data.splits) * loop.eval_iters, self.progress)
        out: dict[str, float] | None = {}
        try:
            for split, tokens in self.data.splits.items():
                sampler = BatchSampler(
                    tokens,
                    self.spec.model.block_size,
                    loop.batch_size,
                    loop.seed + EVAL_SEED_OFFSET,
                    self.ctx.rank,
                    self.ctx.world_size,
                )
                total = 0.0
                for _ in range(loop.eval_iters):
                    if stop is not None and stop.requested():
                        return None
                    x, y = sampler.next_batch(self.device)
                    with self._autocast():
                        _, loss = self.raw_model(x, y)
                    total += loss.item()
                    progress.update()
                out[split] = all_mean(total / loop.eval_iters, self.ctx, self.device)
        finally:
            progress.close()
            self.raw_model.train()
        return out

    def _elapsed(self) -> float:
        """Wall seconds of training so far, including the runs this one resumed."""
        return self.elapsed_before + time.perf_counter() - self._started

    def _provenance(self, val_loss: float | None) -> tuple[dict, Provenance]:
        provenance = Provenance(
            str(self.data.folder), self.step, val_loss, self.tokens_seen, self.spec.flat()
        )
        return self.data.tokenizer_spec, provenance

    def _evaluate_and_save(self, report: RunReport, stop: StopSignal) -> bool:
        """Evaluate, log, save ``best/`` whenever val improved (step 0 included: it prints
        "(best)") and ``latest/`` after step 0; False if a signal cut the eval short."""
        losses = self.evaluate(stop)
        if losses is None:
            return False
        improved = losses["val"] < self.best_val
        if improved:
            self.best_val, self.best_step = losses["val"], self.step
        self.evaluated_step = self.step
        lr = learning_rate(self.step, self.spec.optim, self.spec.lr_decay_iters)
        record = EvalRecord(
            self.step,
            round(losses["train"], 6),
            round(losses["val"], 6),
            lr,
            self.tokens_seen,
            round(self._elapsed(), 2),
        )
        resumable = self.step > 0  # step 0 resumes as a fresh start: no latest/ needed
        state = self._train_state() if resumable else None  # a collective: every rank takes part
        if resumable:
            self.saved_step = self.step
        if not self.ctx.is_main:
            return True
        report.eval_done(record, improved)
        tokenizer_spec, provenance = self._provenance(losses["val"])
        if improved:  # what "(best)" promises: sample and serve it right away
            save_best(
                self.run_dir, self.raw_model, tokenizer_spec, provenance, self.spec.loop.save_dtype
            )
        if resumable:
            save_latest(self.run_dir, self.raw_model, tokenizer_spec, provenance, state)
        return True
