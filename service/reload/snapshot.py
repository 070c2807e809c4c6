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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a checkpoint on disk: the folder's inode plus each file's inode/size/mtime.

    The trainer's atomic swap gives the folder a new inode; a writer that copies files in place
    changes a file's size or mtime instead. Either way the fingerprint changes.
    """

    entries: tuple[tuple[str, int, int, int], ...]  # (name, inode, size, mtime_ns)

    @classmethod
    def of(cls, path: Path) -> Fingerprint | None:
        """None when ``path`` does not exist (e.g. between the two renames of a non-atomic swap)."""
        try:
            st = path.stat()
            entries = [(".", st.st_ino, st.st_size, st.st_mtime_ns)]
            if path.is_dir():
                for child in sorted(path.iterdir()):
                    if child.is_file():
                        c = child.stat()
                        entries.append((child.name, c.st_ino, c.st_size, c.st_mtime_ns))
            return cls(tuple(entries))
        except FileNotFoundError:
            return None


def folder_swapped(now: Fingerprint, live: Fingerprint | None) -> bool:
    return live is None or now.entries[0][1] != live.entries[0][1]


@dataclass(frozen=True)
class ModelInfo:
    """Which checkpoint is live, and where it came from (shown by /v1/models and the metrics)."""

    checkpoint: str  # the path the server was given (not the handle it read through)
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
                if isinstance(prov.get(k), int)
            ),
            None,
        )
        val_loss = prov.get("val_loss", prov.get("best_val_loss"))
        return cls(
            checkpoint=str(path),
            source_format=checkpoint.source_format,
            iteration=iteration,
            val_loss=float(val_loss) if isinstance(val_loss, (int, float)) else None,
            loaded_at=time.time(),
            provenance=prov,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FolderChanged(Exception):
    """The checkpoint was swapped again while being read: not a bad checkpoint, just retry."""


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint read whole, with the fingerprint of the very folder it was read from."""

    checkpoint: Checkpoint
    fingerprint: Fingerprint


def load_consistent(path: Path) -> Snapshot:
    """Load ``path`` as one consistent snapshot, or raise ``FolderChanged`` / ``CheckpointError``.

    A folder is opened first and read through ``/proc/self/fd/N``: every file comes from the folder
    that was opened, whatever the trainer renames meanwhile, so a load that succeeds is consistent
    even if a newer checkpoint arrived during it (the watcher picks that one up next). Without
    ``/proc`` (or for a single-file checkpoint) the path is read and checked unchanged afterwards.
    """
    if not path.exists():
        raise FolderChanged(f"{path} does not exist right now")
    fd = os.open(path, os.O_RDONLY)
    try:
        handle = Path(f"/proc/self/fd/{fd}")
        source = handle if path.is_dir() and handle.is_dir() else path
        fingerprint = Fingerprint.of(source)
        try:
            checkpoint = load_checkpoint(source)
        except (CheckpointError, OSError) as err:
            message = str(err).replace(str(handle), str(path))
            # Deleted under the read, or superseded by a newer checkpoint: not this one's fault.
            if Fingerprint.of(source) != fingerprint or Fingerprint.of(path) != fingerprint:
                raise FolderChanged(message) from err
            raise CheckpointError(message) from err
        if source is path and Fingerprint.of(path) != fingerprint:
            raise FolderChanged(f"{path} changed while it was read")
    finally:
        os.close(fd)
    return Snapshot(dataclasses.replace(checkpoint, path=path), fingerprint)


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
    """Refuse what would break clients: another tokenizer, or non-finite weights."""
    if live_tokenizer_spec is not None and new.tokenizer.spec() != live_tokenizer_spec:
        raise CheckpointError(
            f"{new.path}: its tokenizer differs from the live model's; token ids would change "
            "meaning under running clients (restart the server to change tokenizers)"
        )
    for name, tensor in new.model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{new.path}: tensor {name} has NaN or infinite values")
