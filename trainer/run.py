"""One training job from start to finish: join torchrun, check the run folder, train, clean up.

Failures a user can fix (out of memory, a run folder in the way) become ``TrainerError``; the
checkpoints already in the run folder are never touched by a failed run (writes are atomic).
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import TrainSpec
from trainer.data import TokenData
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.errors import TrainerError
from trainer.loop import Trainer, TrainResult

_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")


def train(
    spec: TrainSpec, data_dir: Path, run_dir: Path, *, resume: bool = False, progress: bool = True
) -> TrainResult | None:
    """Train; returns the result on rank 0 (None on other ranks)."""
    data = TokenData.open(data_dir)
    if not resume and (run_dir / "latest").exists():
        raise TrainerError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out"
        )
    ctx, device = init_distributed(spec.loop.device)
    try:
        trainer = Trainer(
            spec, data, run_dir, resume=resume, ctx=ctx, device=device, progress=progress
        )
        result = trainer.run()
    except torch.OutOfMemoryError:
        raise _oom(spec, device) from None
    except RuntimeError as err:
        if any(marker in str(err) for marker in _OOM_MARKERS):
            raise _oom(spec, device) from None
        raise
    finally:
        shutdown_distributed(ctx)
    return result if ctx.is_main else None


def _oom(spec: TrainSpec, device: torch.device) -> TrainerError:
    loop, shape = spec.loop, spec.model
    return TrainerError(
        f"out of memory on {device} with batch_size {loop.batch_size} x block_size "
        f"{shape.block_size} (n_embd {shape.n_embd}, n_layer {shape.n_layer}); lower --batch-size "
        "and raise --grad-accum-steps to keep the same effective batch"
    )
