"""Optional metric destinations beside ``log.jsonl``: TensorBoard and Weights & Biases.

TensorBoard (``pip install 'gptserve[tensorboard]'``) is written to ``RUN/tensorboard/`` whenever
the package is importable (``--no-tensorboard`` turns it off). W&B is opt-in (``--wandb``), as in
nanoGPT, and needs the ``wandb`` package, which gptserve does not depend on; the W&B run id is kept
in ``RUN/wandb_run_id`` so that ``--resume`` continues the same W&B run.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from trainer.config import TrainSpec
from trainer.errors import TrainerError
from trainer.metrics import EvalRecord, StepRecord

WANDB_ID_FILE = "wandb_run_id"


class MetricSinks:
    """Owns the TensorBoard writer and the W&B run of one training run (rank 0 only)."""

    def __init__(self, spec: TrainSpec, run_dir: Path, start_step: int) -> None:
        self.run_dir = run_dir
        self.tensorboard = (
            _tensorboard_writer(run_dir, start_step) if spec.log.tensorboard else None
        )
        self.wandb = _wandb_run(spec, run_dir) if spec.log.wandb else None

    def describe(self) -> str:
        """One line saying where metrics go, for the start-up banner."""
        out = [f"{self.run_dir / 'log.jsonl'}"]
        if self.tensorboard is not None:
            out.append(f"TensorBoard {self.run_dir / 'tensorboard'}")
        if self.wandb is not None:
            out.append(f"W&B run {self.wandb.id}")
        return ", ".join(out)

    def step(self, record: StepRecord) -> None:
        scalars = {
            "train/loss": record.loss,
            "train/lr": record.lr,
            "train/grad_norm": record.grad_norm,
            "train/tokens_per_s": record.tokens_per_s,
            "train/mfu": record.mfu,
        }
        self._log(scalars, record.step)

    def eval(self, record: EvalRecord) -> None:
        self._log(
            {"eval/train_loss": record.train_loss, "eval/val_loss": record.val_loss}, record.step
        )

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

    def _log(self, scalars: dict[str, float | None], step: int) -> None:
        scalars = {name: value for name, value in scalars.items() if value is not None}
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)


def _tensorboard_writer(run_dir: Path, start_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None  # the extra is not installed: log.jsonl alone
    # On resume, hide what a killed run wrote past its checkpoint (events at steps > start_step).
    purge = start_step + 1 if start_step > 0 else None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)


def _wandb_run(spec: TrainSpec, run_dir: Path) -> Any:
    try:
        import wandb
    except ImportError:
        raise TrainerError(
            "--wandb: the wandb package is not installed (pip install wandb), or drop --wandb"
        ) from None
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=spec.log.wandb_project,
        name=run_dir.resolve().name,
        id=run_id,
        resume="allow",
        config=spec.flat(),
        dir=str(run_dir),
    )
