"""Checkpoint I/O: one loader for every format users have, one atomic writer.

``load_checkpoint(path)`` detects and reads:
- gptserve's native folder (``model.safetensors`` + ``config.json`` with ``"format": "gptserve"``);
- nanoGPT's ``ckpt.pt`` (the file, or a folder holding it) with an optional ``meta.pkl`` beside it;
- a Hugging Face GPT-2 folder (``config.json`` with ``"model_type": "gpt2"``).

Whatever is wrong with a checkpoint, the loader raises one ``CheckpointError`` whose message
names the file and the problem (see ``common.py`` for the order of checks, ``files.py`` for which
files are read at all, ``budget.py`` for the memory check).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.checkpoint.atomic import recover_interrupted_swap
from model.checkpoint.budget import Budget, BudgetError, host_budget
from model.checkpoint.common import Checkpoint, CheckpointError
from model.checkpoint.files import CheckpointFiles, checkpoint_kind
from model.checkpoint.huggingface import export_huggingface, is_huggingface, load_huggingface
from model.checkpoint.naming import default_model_name, run_checkpoint
from model.checkpoint.nanogpt import load_nanogpt
from model.checkpoint.native import CONFIG, is_native, load_native, save_checkpoint
from model.tokenizer import TokenizerError

__all__ = [
    "Budget",
    "BudgetError",
    "Checkpoint",
    "CheckpointError",
    "default_model_name",
    "export_huggingface",
    "load_checkpoint",
    "run_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger(__name__)


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    budget: Budget = host_budget,
) -> Checkpoint:
    """Load any supported checkpoint; the model comes back in eval mode on ``device``/``dtype``.

    ``budget(config)`` runs once the shape is known and before any tensor is allocated; the
    default refuses a model whose load would not fit in this process's host memory. A trainer run
    folder loads its ``best/``, else its ``latest/``.
    """
    path = run_checkpoint(path)
    try:
        recover_interrupted_swap(path)
        checkpoint = _detect_and_load(path, budget)
        checkpoint.model.to(device=device, dtype=dtype)
    except CheckpointError:
        raise
    except TokenizerError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: ran out of memory while loading") from None
    except Exception as err:  # noqa: BLE001 - a case no check foresaw is still one clear refusal
        log.warning("unexpected error while loading %s", path, exc_info=True)
        text = str(err).strip().splitlines()
        detail = f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({detail})") from None
    return checkpoint


def _detect_and_load(path: Path, budget: Budget) -> Checkpoint:
    if checkpoint_kind(path) == "file":
        if path.suffix not in (".pt", ".pth", ".bin"):
            raise CheckpointError(
                f"{path}: unknown checkpoint file (expected a nanoGPT .pt, or a checkpoint folder)"
            )
        with CheckpointFiles(path.parent) as files:
            return load_nanogpt(files, path.name, budget, follow=True)
    with CheckpointFiles(path) as files:
        meta = files.read_json(CONFIG) if files.exists(CONFIG) else None
        if is_native(meta):
            return load_native(files, meta, budget)
        if is_huggingface(meta):
            return load_huggingface(files, meta, budget)
        if files.exists("ckpt.pt"):
            return load_nanogpt(files, "ckpt.pt", budget)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected gptserve config.json + model.safetensors, "
        "a Hugging Face GPT-2 folder, or nanoGPT's ckpt.pt)"
    )
