"""torchrun integration: who this process is, and the process group's lifetime.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) the job joins a
process group: NCCL on GPUs, gloo on CPU. Only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.errors import TrainerError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group if there is one; returns the context and this rank's device."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext(), _resolve_device(device, 0)
    ctx = DistContext(
        int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    )
    target = _resolve_device(device, ctx.local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return ctx, target


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank; a rank leaving early while rank 0 still writes can abort gloo's peer."""
    if ctx.enabled:
        dist.barrier()


def all_mean(value: float, ctx: DistContext, device: torch.device) -> float:
    """Mean of a float over all ranks (identity for one process)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def gather_objects(obj: object, ctx: DistContext) -> list[object]:
    """Every rank's ``obj``, in rank order (used for per-rank RNG states)."""
    if not ctx.enabled:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainerError(f"--device {device}: no CUDA GPU is available to this torch build")
    try:
        target = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    except RuntimeError:
        raise TrainerError(f"--device {device}: not a device name (cpu, cuda, cuda:N)") from None
    if target.type == "cuda" and target.index is not None:
        count = torch.cuda.device_count()
        if target.index >= count:
            raise TrainerError(
                f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    return target
