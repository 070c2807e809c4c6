"""One training job from start to finish: settle its spec, join torchrun, claim the run folder,
train, clean up.

A fresh run's spec comes from the flags (``--preset`` under explicit ones); a resumed run's from
its checkpoint, with only the flags named again overriding it. Failures a user can fix (out of
memory, a full disk, a run folder in the way) become ``TrainerError``; the checkpoints already in
the run folder are never touched by a failed run (writes are atomic).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainSpec, build_train_spec, resume_spec
from trainer.data import TokenData
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.errors import TrainerError
from trainer.loop import Trainer, TrainResult
from trainer.run_folder import (
    RunFolderLock,
    disk_full_error,
    is_disk_full,
    recorded_settings,
    remove_stale_writes,
)

_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")


def plan_run(
    run_dir: Path, preset: str | None, overrides: Mapping[str, Any], resume: bool
) -> tuple[TrainSpec, list[str]]:
    """The run's spec and the lines to print about it (resume point, overrides)."""
    try:
        if not resume:
            return build_train_spec(preset, **overrides), []
        recorded, step = recorded_settings(run_dir)
        spec, notes = resume_spec(recorded, preset, overrides)
    except ValueError as err:
        raise TrainerError(str(err)) from None
    return spec, [f"resuming {run_dir} from step {step}", *notes]


def train(
    data_dir: Path,
    run_dir: Path,
    *,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult | None:
    """Train; returns the result on rank 0 (None on other ranks)."""
    spec, notes = plan_run(run_dir, preset, overrides or {}, resume)
    data = TokenData.open(data_dir)
    data.check_block_size(spec.model.block_size)
    ctx, device = init_distributed(spec.loop.device)
    try:
        with RunFolderLock(run_dir) if ctx.is_main else contextlib.nullcontext():
            if ctx.is_main:
                notes += _prepare_folder(run_dir, resume)
            trainer = Trainer(
                spec, data, run_dir, resume=resume, ctx=ctx, device=device, progress=progress
            )
            if ctx.is_main:  # now that the checkpoint has loaded
                for line in notes:
                    print(line, file=sys.stderr, flush=True)
            result = trainer.run()
    except torch.OutOfMemoryError:
        raise _oom(spec, device) from None
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_error(run_dir) from None
        if isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MARKERS):
            raise _oom(spec, device) from None
        raise
    finally:
        shutdown_distributed(ctx)
    return result if ctx.is_main else None


def _prepare_folder(run_dir: Path, resume: bool) -> list[str]:
    """Under the run folder's lock: refuse to overwrite a run, sweep a dead writer's leftovers."""
    if not resume and (run_dir / "latest").exists():
        raise TrainerError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out"
        )
    removed, freed = remove_stale_writes(run_dir)
    if not removed:
        return []
    return [
        f"removed {removed} temporary file(s) or folder(s) ({freed / 2**20:.1f} MiB) left by a "
        "save that was killed"
    ]


def _oom(spec: TrainSpec, device: torch.device) -> TrainerError:
    loop, shape = spec.loop, spec.model
    return TrainerError(
        f"out of memory on {device} with batch_size {loop.batch_size} x block_size "
        f"{shape.block_size} (n_embd {shape.n_embd}, n_layer {shape.n_layer}); lower --batch-size "
        "and raise --grad-accum-steps to keep the same effective batch"
    )
