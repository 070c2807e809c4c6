"""The run's metrics on disk: ``log.jsonl`` (per-step and eval records) and ``loss_curve.png``.

``log.jsonl`` holds one JSON object per line, told apart by ``kind``:

- ``"train"``, every ``--log-interval`` steps: ``step``, ``loss`` (that step's training loss, the
  mean over its micro-batches), ``lr``, ``grad_norm`` (global norm before clipping),
  ``tokens_per_s`` and ``mfu`` (over the training time since the previous record, evals, saves
  and a process's first step excluded; null when no step was timed yet), ``tokens_seen``,
  ``elapsed_s``. ``lr`` is the learning rate the step used; ``step`` counts steps done.
- ``"eval"``, every ``--eval-interval`` steps: ``step``, ``train_loss`` and ``val_loss`` (means over
  ``--eval-iters`` fixed batches per split), ``lr``, ``tokens_seen``, ``elapsed_s``.

Lines without ``kind`` (logs written before per-step records existed) are eval records.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class EvalRecord:
    """One periodic evaluation: mean losses over ``eval_iters`` fixed batches per split."""

    step: int
    train_loss: float
    val_loss: float
    lr: float
    tokens_seen: int
    elapsed_s: float
    kind: str = "eval"


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step's training metrics, written every ``log_interval`` steps."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float | None  # None: no timed step since the last record (warm-up)
    mfu: float | None
    tokens_seen: int
    elapsed_s: float
    kind: str = "train"


Record = EvalRecord | StepRecord
_KINDS = {"eval": EvalRecord, "train": StepRecord}


class MetricsLog:
    """Owns ``log.jsonl`` and ``loss_curve.png`` in a run folder (rank 0 only)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "log.jsonl"
        self.png = run_dir / "loss_curve.png"
        self.records: list[Record] = []

    def start_fresh(self) -> None:
        self.records = []
        self.path.write_text("")

    def resume_at(self, step: int) -> None:
        """Keep the records up to ``step`` (the checkpoint resumed from); drop any written later."""
        self.records = [r for r in self._read() if r.step <= step]
        _write_atomically(
            self.path, "".join(json.dumps(asdict(r)) + "\n" for r in self.records).encode()
        )

    def append(self, record: Record) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(record)) + "\n")

    def plot(self) -> None:
        plot_losses(self.records, self.png)

    def _read(self) -> list[Record]:
        if not self.path.is_file():
            return []
        records: list[Record] = []
        for line in self.path.read_text().splitlines():
            try:
                raw = json.loads(line)
                records.append(_KINDS[raw.get("kind", "eval")](**raw))
            except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
                break  # a line torn by a hard kill: it and anything after it is dropped
        return records


def curve_series(records: list[Record]) -> dict[str, tuple[list[int], list[float]]]:
    """The loss curve's lines, label -> (steps, losses): every per-step record's training loss,
    and the eval records' train and val losses."""
    steps = [r for r in records if isinstance(r, StepRecord)]
    evals = [r for r in records if isinstance(r, EvalRecord)]
    return {
        "train (per step)": ([r.step for r in steps], [r.loss for r in steps]),
        "train (eval)": ([r.step for r in evals], [r.train_loss for r in evals]),
        "val (eval)": ([r.step for r in evals], [r.val_loss for r in evals]),
    }


_STYLE = {
    "train (per step)": dict(color="tab:blue", alpha=0.35, linewidth=1),
    "train (eval)": dict(color="tab:blue", marker="."),
    "val (eval)": dict(color="tab:orange", marker="."),
}


def plot_losses(records: list[Record], png: Path) -> None:
    """``curve_series`` vs step, written atomically (matplotlib's Agg backend, no display)."""
    from matplotlib.figure import Figure  # Figure() needs no pyplot and no GUI backend

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for label, (x, y) in curve_series(records).items():
        if x:
            ax.plot(x, y, label=label, **_STYLE[label])
    evals = [r for r in records if isinstance(r, EvalRecord)]
    if evals:
        best = min(evals, key=lambda r: r.val_loss)
        ax.set_title(f"best val loss {best.val_loss:.4f} at step {best.step}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = png.with_name(png.name + ".tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write (a full disk), leave no stray file


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
