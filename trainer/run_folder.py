"""The run folder as a whole: who may write it, what a dead writer left behind, what it records.

A trainer holds an exclusive ``flock`` on ``RUN/.lock`` for its whole life (rank 0 under DDP;
the kernel drops the lock when the process dies, however it dies). So when a trainer starts and
gets the lock, every temporary checkpoint folder (``.best.tmp-*``, ``.latest.tmp-*``, written by
``model.checkpoint.atomic.atomic_folder``) in the run folder was left by a writer that died
mid-save, and is removed. A second trainer on the same run folder is refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from model.checkpoint import recover_interrupted_swap
from trainer.errors import TrainerError

LOCK_FILE = ".lock"
CHECKPOINTS = ("best", "latest")
# What atomic_folder (model/checkpoint/atomic.py) and metrics.py leave when killed mid-write.
_STALE_DIRS = tuple(f".{name}.{kind}-*" for name in CHECKPOINTS for kind in ("tmp", "old"))
_STALE_FILES = ("log.jsonl.tmp", "loss_curve.png.tmp")


class RunFolderLock:
    """Owns ``RUN/.lock``: one trainer per run folder, held from start to exit."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainerError(
                f"{self.run_dir} is in use by another trainer (pid {holder}); wait for it to "
                "finish, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_writes(run_dir: Path) -> tuple[int, int]:
    """Remove what writers that died mid-save left; returns (entries removed, bytes freed).

    Call only while holding the run folder's lock: then no live writer owns any of them.
    """
    for name in CHECKPOINTS:
        recover_interrupted_swap(run_dir / name)  # a swap that died between its two renames
    stale = [p for pattern in _STALE_DIRS for p in run_dir.glob(pattern) if p.is_dir()]
    stale += [run_dir / name for name in _STALE_FILES if (run_dir / name).is_file()]
    freed = 0
    for path in stale:
        if path.is_dir():
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
        else:
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
    return len(stale), freed


def recorded_settings(run_dir: Path) -> tuple[dict[str, Any], int]:
    """The hyperparameters and step that ``RUN/latest`` was saved with (its config.json)."""
    config = run_dir / "latest" / "config.json"
    try:
        provenance = json.loads(config.read_text(encoding="utf-8"))["provenance"]
        return dict(provenance["hyperparameters"]), int(provenance["iterations"])
    except FileNotFoundError:
        raise TrainerError(
            f"--resume: {run_dir} has no latest/ checkpoint to resume from "
            "(start the run without --resume)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrainerError(
            f"--resume: {config} does not record the run's settings ({err})"
        ) from None


def latest_step(run_dir: Path) -> int | None:
    """The step ``RUN/latest`` holds, or None when there is no readable one."""
    try:
        return recorded_settings(run_dir)[1]
    except TrainerError:
        return None


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a full disk or an exceeded quota.

    torch.save reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc]``
    with the OSError chained as its context; safetensors as "No space left on device (os error
    28)" in its own exception's message.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "os error 28" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_error(run_dir: Path) -> TrainerError:
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    step, best = latest_step(run_dir), _best_step(run_dir)
    if step is not None:
        kept = f"{run_dir / 'latest'} (step {step}) is intact: free some space, then add --resume"
    elif best is not None:
        kept = (
            f"{run_dir / 'best'} (step {best}) is intact but there is no latest/ to resume from: "
            "free some space, then start the run again (or serve best/)"
        )
    else:
        kept = "no checkpoint had been written yet"
    return TrainerError(f"the disk holding {run_dir} is full ({free}); {kept}")


def _best_step(run_dir: Path) -> int | None:
    """The step ``RUN/best`` holds, or None when there is none that loads."""
    from model.checkpoint import CheckpointError, load_checkpoint

    try:
        return int(load_checkpoint(run_dir / "best").provenance["iterations"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return None
