"""The name a checkpoint is served under when the operator gives none (``--model-name`` wins).

In order: the ``name`` its provenance records; for a trainer run's ``best/`` or ``latest/`` the
run folder's name (``runs/mine/best`` -> ``mine``); for a nanoGPT ``ckpt.pt`` its folder's name;
else the checkpoint folder's own name. Here too: which checkpoint a run folder stands for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from model.checkpoint.files import CheckpointError, CheckpointFiles

RUN_FOLDERS = ("best", "latest")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")


def run_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path stands for: a trainer run folder (it holds ``best/`` or ``latest/``
    and is no checkpoint itself) stands for its ``best/`` if present, else its ``latest/``; any
    other path stands for itself."""
    path = Path(path)
    try:
        if not path.is_dir() or (path / "config.json").exists():
            return path
        return next((path / n for n in RUN_FOLDERS if (path / n).is_dir()), path)
    except OSError:  # unreadable: the loader says why
        return path


def default_model_name(path: str | Path) -> str:
    path = Path(os.path.abspath(path))  # not resolve(): a symlink's own name is the operator's
    folder = path.parent if path.suffix in (".pt", ".pth", ".bin") else path
    named = _provenance_name(folder) if folder is path else None
    if named is not None:
        return named
    if folder.name in RUN_FOLDERS and folder.parent.name:
        return folder.parent.name
    return folder.name or "model"


def _provenance_name(folder: Path) -> str | None:
    """``provenance.name`` from a native config.json, read like any checkpoint file (a plain file
    inside the folder); None when absent, unreadable or not a plain model id."""
    try:
        with CheckpointFiles(folder) as files:
            meta = files.read_json("config.json") if files.exists("config.json") else None
    except CheckpointError:
        return None
    provenance = meta.get("provenance") if isinstance(meta, dict) else None
    name = provenance.get("name") if isinstance(provenance, dict) else None
    return name if isinstance(name, str) and _NAME.fullmatch(name) else None
