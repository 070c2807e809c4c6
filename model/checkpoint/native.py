"""gptserve's native checkpoint: a folder with ``model.safetensors`` and ``config.json``.

``config.json`` holds ``{"format": "gptserve", "format_version": 1, "model": GPTConfig,
"tokenizer": spec, "provenance": {...}}``. Tied ``lm_head.weight`` is not stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.checkpoint.atomic import atomic_folder
from model.checkpoint.common import Checkpoint, CheckpointError, build_model
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import TokenizerError, tokenizer_from_spec

FORMAT = "gptserve"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_checkpoint(
    path: str | Path,
    model: GPT,
    tokenizer_spec: dict[str, Any],
    provenance: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write ``model`` as a native checkpoint folder at ``path``, atomically.

    ``dtype`` (e.g. ``torch.float16``) casts floating weights for a smaller file.
    ``extra_files`` maps a file name to a function that writes it (optimizer state, logs); they
    land in the same atomic swap as the weights.
    """
    path = Path(path)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"  # tied to transformer.wte.weight
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "tokenizer": tokenizer_spec,
        "provenance": dict(provenance or {}),
    }
    with atomic_folder(path) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return path


def is_native(folder: Path) -> bool:
    meta = read_json(folder / CONFIG)
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None


def load_native(folder: Path) -> Checkpoint:
    meta = read_json(folder / CONFIG)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG}: unsupported format_version {version!r}")
    try:
        config = GPTConfig.from_dict(meta["model"])
        tokenizer = tokenizer_from_spec(meta["tokenizer"], folder)
    except KeyError as err:
        raise CheckpointError(f"{folder / CONFIG}: missing key {err.args[0]!r}") from None
    except (TypeError, ValueError, TokenizerError) as err:
        raise CheckpointError(f"{folder / CONFIG}: {err}") from None
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({err})") from None
    model = build_model(config, state, weights)
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        config=config,
        source_format=FORMAT,
        path=folder,
        provenance=dict(meta.get("provenance") or {}),
    )
