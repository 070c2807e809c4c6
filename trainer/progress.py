"""What a person watching a run sees: the progress bar, the JSONL eval log, the loss-curve PNG."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class EvalRecord:
    """One periodic evaluation: mean losses over ``eval_iters`` fixed batches per split."""

    step: int
    train_loss: float
    val_loss: float
    lr: float
    tokens_seen: int
    elapsed_s: float


class EvalLog:
    """Owns ``log.jsonl`` (one EvalRecord per line) and ``loss_curve.png`` in a run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "log.jsonl"
        self.png = run_dir / "loss_curve.png"
        self.records: list[EvalRecord] = []

    def resume_at(self, step: int) -> None:
        """Keep the records up to ``step`` (the checkpoint resumed from); drop any written later."""
        self.records = [r for r in self._read() if r.step <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.records))
        os.replace(tmp, self.path)

    def start_fresh(self) -> None:
        self.records = []
        self.path.write_text("")

    def append(self, record: EvalRecord) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(record)) + "\n")
        self.plot()

    def plot(self) -> None:
        plot_losses(self.records, self.png)

    def _read(self) -> list[EvalRecord]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(EvalRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                break  # a line torn by a hard kill: it and anything after it is dropped
        return records


def plot_losses(records: list[EvalRecord], png: Path) -> None:
    """Train and val loss vs step, written atomically (matplotlib's Agg backend, no display)."""
    from matplotlib.figure import Figure  # Figure() needs no pyplot and no GUI backend

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    steps = [r.step for r in records]
    ax.plot(steps, [r.train_loss for r in records], label="train", marker=".")
    ax.plot(steps, [r.val_loss for r in records], label="val", marker=".")
    if records:
        best = min(records, key=lambda r: r.val_loss)
        ax.set_title(f"best val loss {best.val_loss:.4f} at step {best.step}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = png.with_name(png.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, png)


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss, tokens/s, MFU and (tqdm's own) ETA.

    MFU = achieved model FLOP/s / peak FLOP/s, where model FLOPs follow PaLM's appendix B
    convention (6N + 12·L·H·Q·T per token, ``GPT.estimate_flops_per_token``).
    """

    def __init__(
        self,
        start: int,
        total: int,
        tokens_per_step: int,
        flops_per_token: int,
        peak_flops: float,
        enabled: bool,
    ) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._bar = tqdm(
            total=total,
            initial=start,
            disable=not enabled,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0 if _isatty() else 30.0,
        )
        self._last = time.perf_counter()
        self._tokens_per_s = 0.0

    def step(self, loss: float) -> None:
        now = time.perf_counter()
        rate = self.tokens_per_step / max(now - self._last, 1e-9)
        self._last = now
        # exponential moving average, so one slow step (an eval, a save) does not dominate
        self._tokens_per_s = (
            rate if self._tokens_per_s == 0 else 0.9 * self._tokens_per_s + 0.1 * rate
        )
        mfu = self._tokens_per_s * self.flops_per_token / self.peak_flops
        self._bar.set_postfix(
            loss=f"{loss:.4f}",
            tok_s=f"{self._tokens_per_s:,.0f}",
            mfu=f"{100 * mfu:.1f}%",
            refresh=False,
        )
        self._bar.update(1)

    def pause(self) -> None:
        """Restart the rate clock after work that is not a training step (eval, checkpointing)."""
        self._last = time.perf_counter()

    def write(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)  # beside the bar, unbuffered under nohup

    def close(self) -> None:
        self._bar.close()

    @property
    def tokens_per_s(self) -> float:
        return self._tokens_per_s


def _isatty() -> bool:
    return sys.stderr.isatty()
