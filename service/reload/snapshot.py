"""Reading a checkpoint that a trainer may be rewriting: identity, consistent loads, checks.

The trainer replaces a checkpoint folder atomically (``model.checkpoint.atomic``), so the folder's
identity (``Fingerprint``) changing is the signal that a complete new checkpoint is there.
``load_consistent`` reads config and weights through one open handle on the folder, so both come
from the same checkpoint whatever is renamed meanwhile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.checkpoint import Budget, Checkpoint, CheckpointError, load_checkpoint
from model.checkpoint.budget import host_budget
from model.checkpoint.files import checkpoint_kind, describe_os_error
from model.checkpoint.naming import RUN_FOLDERS


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a checkpoint on disk: the folder's inode plus each entry's inode/size/mtime.

    The trainer's atomic swap gives the folder a new inode; a writer that copies files in place
    changes a file's size or mtime instead. Either way the fingerprint changes.
    """

    entries: tuple[tuple[str, int, int, int], ...]  # (name, inode, size, mtime_ns)

    @classmethod
    def of(cls, path: Path) -> Fingerprint | None:
        """None when ``path`` does not exist (e.g. between the two renames of a non-atomic swap);
        ``CheckpointError`` when it cannot be looked at (a symlink loop, no permission)."""
        try:
            st = os.stat(path)
            entries = [(".", st.st_ino, st.st_size, st.st_mtime_ns)]
            if stat.S_ISDIR(st.st_mode):
                with os.scandir(path) as scan:  # every entry, not followed: a swapped-in FIFO or
                    for entry in sorted(scan, key=lambda e: e.name):  # symlink changes it too
                        c = entry.stat(follow_symlinks=False)
                        entries.append((entry.name, c.st_ino, c.st_size, c.st_mtime_ns))
            return cls(tuple(entries))
        except FileNotFoundError:
            return None
        except OSError as err:
            raise describe_os_error(path, err) from None


def folder_swapped(now: Fingerprint, live: Fingerprint | None) -> bool:
    return live is None or now.entries[0][1] != live.entries[0][1]


@dataclass(frozen=True)
class ModelInfo:
    """Which checkpoint is live, and where it came from (shown by /v1/models and the metrics).

    ``path`` is for the operator's logs and metrics; what clients see (``to_dict``) names the
    checkpoint without a filesystem path.
    """

    path: Path  # the path the server was given (not the handle it read through)
    source_format: str
    iteration: int | None
    val_loss: float | None
    loaded_at: float  # unix time the switch happened
    provenance: dict[str, Any]

    @classmethod
    def of(cls, checkpoint: Checkpoint, path: Path) -> ModelInfo:
        prov = dict(checkpoint.provenance)
        iteration = next(
            (
                prov[k]
                for k in ("iterations", "iteration", "iter_num", "step")
                if isinstance(prov.get(k), int) and not isinstance(prov.get(k), bool)
            ),
            None,
        )
        val_loss = prov.get("val_loss", prov.get("best_val_loss"))
        return cls(
            path=Path(path),
            source_format=checkpoint.source_format,
            iteration=iteration,
            val_loss=float(val_loss)
            if isinstance(val_loss, (int, float)) and not isinstance(val_loss, bool)
            else None,
            loaded_at=time.time(),
            provenance=prov,
        )

    @property
    def checkpoint(self) -> str:
        """The checkpoint's name: ``run/best`` for a trainer run's folder, else its own name."""
        name = self.path.name
        if name in RUN_FOLDERS and self.path.parent.name:
            return f"{self.path.parent.name}/{name}"
        return name

    def to_dict(self) -> dict[str, Any]:
        """What clients see: no absolute filesystem path, in the name or in the provenance."""
        return {
            "checkpoint": self.checkpoint,
            "source_format": self.source_format,
            "iteration": self.iteration,
            "val_loss": self.val_loss,
            "loaded_at": self.loaded_at,
            "provenance": _without_paths(self.provenance),
        }


def _without_paths(value: Any) -> Any:
    """``value`` with every absolute path (a dataset folder, an HF ``name_or_path``) cut to its
    last component."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str) and (
        value.startswith(("/", "~", "\\")) or re.match(r"[A-Za-z]:[\\/]", value)
    ):
        return re.split(r"[\\/]", value.rstrip("/\\"))[-1]
    return value


class FolderChanged(Exception):
    """The checkpoint was swapped again while being read: not a bad checkpoint, just retry."""


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint read whole, with the fingerprint of the very folder it was read from."""

    checkpoint: Checkpoint
    fingerprint: Fingerprint


def load_consistent(path: Path, budget: Budget = host_budget) -> Snapshot:
    """Load ``path`` as one consistent snapshot, or raise ``FolderChanged`` / ``CheckpointError``.

    A folder is opened first and read through ``/proc/self/fd/N``: every file comes from the folder
    that was opened, whatever the trainer renames meanwhile, so a load that succeeds is consistent
    even if a newer checkpoint arrived during it (the watcher picks that one up next). Without
    ``/proc`` (or for a single-file checkpoint) the path is read and checked unchanged afterwards.
    """
    kind = checkpoint_kind(path)  # "does not exist", a symlink loop, a FIFO: said plainly
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECTORY if kind == "folder" else 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise describe_os_error(path, err) from None
    try:
        handle = Path(f"/proc/self/fd/{fd}")
        source = handle if kind == "folder" and handle.is_dir() else path
        fingerprint = Fingerprint.of(source)
        try:
            checkpoint = load_checkpoint(source, budget=budget)
        except CheckpointError as err:
            message = str(err).replace(str(handle), str(path))
            # Deleted under the read, or superseded by a newer checkpoint: not this one's fault.
            if _changed(source, fingerprint) or _changed(path, fingerprint):
                raise FolderChanged(message) from err
            raise type(err)(message) from None
        if source is path and _changed(path, fingerprint):
            raise FolderChanged(f"{path} changed while it was read")
    finally:
        os.close(fd)
    return Snapshot(dataclasses.replace(checkpoint, path=path), fingerprint)


def _changed(path: Path, fingerprint: Fingerprint | None) -> bool:
    try:
        return Fingerprint.of(path) != fingerprint
    except CheckpointError:
        return True


def system_fingerprint(engine: object) -> str | None:
    """The checkpoint an engine serves, as OpenAI's ``system_fingerprint``: ``it<iteration>-<hash>``.

    The hash covers the provenance (the trainer stamps each save with its step, loss and date) and
    the model's shape, so replicas serving the same checkpoint agree and each new checkpoint gets a
    new fingerprint; responses carry it, telling a client which checkpoint answered.
    """
    checkpoint = getattr(engine, "checkpoint", None)
    if not isinstance(checkpoint, Checkpoint):
        return None
    info = ModelInfo.of(checkpoint, checkpoint.path)
    blob = json.dumps(
        [checkpoint.provenance, checkpoint.config.to_dict()], sort_keys=True, default=str
    )
    digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
    return f"it{info.iteration}-{digest}" if info.iteration is not None else f"ck-{digest}"


def check_compatible(new: Checkpoint, live_tokenizer_spec: dict[str, Any] | None) -> None:
    """Refuse what would break clients: another tokenizer (non-finite weights never load)."""
    if live_tokenizer_spec is not None and new.tokenizer.spec() != live_tokenizer_spec:
        raise CheckpointError(
            f"{new.path}: its tokenizer differs from the live model's; token ids would change "
            "meaning under running clients (restart the server to change tokenizers)"
        )
