"""Checkpoint I/O: one loader for every format users have, one atomic writer.

``load_checkpoint(path)`` detects and reads:
- gptserve's native folder (``model.safetensors`` + ``config.json`` with ``"format": "gptserve"``);
- nanoGPT's ``ckpt.pt`` (the file, or a folder holding it) with an optional ``meta.pkl`` beside it;
- a Hugging Face GPT-2 folder (``config.json`` with ``"model_type": "gpt2"``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint.atomic import recover_interrupted_swap
from model.checkpoint.common import Checkpoint, CheckpointError
from model.checkpoint.huggingface import export_huggingface, is_huggingface, load_huggingface
from model.checkpoint.nanogpt import load_nanogpt
from model.checkpoint.native import is_native, load_native, read_json, save_checkpoint
from model.tokenizer import TokenizerError

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "export_huggingface",
    "load_checkpoint",
    "save_checkpoint",
]


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Checkpoint:
    """Load any supported checkpoint; the model comes back in eval mode on ``device``/``dtype``."""
    path = Path(path)
    recover_interrupted_swap(path)
    try:
        checkpoint = _detect_and_load(path)
    except TokenizerError as err:
        raise CheckpointError(f"{path}: {err}") from None
    checkpoint.model.to(device=device, dtype=dtype)
    return checkpoint


def _detect_and_load(path: Path) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".bin"):
            return load_nanogpt(path)
        raise CheckpointError(
            f"{path}: unknown checkpoint file (expected a nanoGPT .pt, or a checkpoint folder)"
        )
    if is_native(path):
        return load_native(path)
    meta = read_json(path / "config.json")
    if is_huggingface(meta):
        return load_huggingface(path, meta)
    if (path / "ckpt.pt").is_file():
        return load_nanogpt(path / "ckpt.pt")
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected gptserve config.json + model.safetensors, "
        "a Hugging Face GPT-2 folder, or nanoGPT's ckpt.pt)"
    )
