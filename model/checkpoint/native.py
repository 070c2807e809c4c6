"""gptserve's native checkpoint: a folder with ``model.safetensors`` and ``config.json``.

``config.json`` holds ``{"format": "gptserve", "format_version": 1, "model": GPTConfig,
"tokenizer": spec, "provenance": {...}}``. Tied ``lm_head.weight`` is not stored. A BPE
checkpoint also holds its ranks (``tokenizer.tiktoken``, sha256 in the spec), so serving it
needs no tiktoken cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model.checkpoint.atomic import atomic_folder
from model.checkpoint.budget import Budget, apply_budget
from model.checkpoint.common import Checkpoint, CheckpointError, build_model, check_vocab
from model.checkpoint.files import CheckpointFiles
from model.checkpoint.tensors import read_safetensors
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import (
    RANKS_FILE,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
    tokenizer_from_spec,
)

FORMAT = "gptserve"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_checkpoint(
    path: str | Path,
    model: GPT,
    tokenizer: Tokenizer | Mapping[str, Any],
    provenance: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write ``model`` as a native checkpoint folder at ``path``, atomically.

    ``tokenizer`` is a ``Tokenizer`` or its spec; a BPE tokenizer's ranks are written beside the
    weights (``tokenizer.tiktoken``, sha256 recorded in config.json).
    ``dtype`` (e.g. ``torch.float16``) casts floating weights for a smaller file.
    ``extra_files`` maps a file name to a function that writes it (optimizer state, logs); they
    land in the same atomic swap as the weights.
    """
    path = Path(path)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = tokenizer_from_spec(dict(tokenizer))
    check_vocab(tokenizer, model.config, path)
    ranks = None
    if isinstance(tokenizer, TiktokenTokenizer):
        spec, ranks = tokenizer.stored_spec()
    else:
        spec = tokenizer.spec()
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
        "tokenizer": spec,
        "provenance": dict(provenance or {}),
    }
    with atomic_folder(path) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        if ranks is not None:
            (tmp / RANKS_FILE).write_bytes(ranks)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return path


def is_native(meta: object) -> bool:
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def load_native(files: CheckpointFiles, meta: dict, budget: Budget) -> Checkpoint:
    where = files.where(CONFIG)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unsupported format_version {version!r}")
    for key in ("model", "tokenizer"):
        if key not in meta:
            raise CheckpointError(f"{where}: missing key {key!r}")
    provenance = meta.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise CheckpointError(f"{where}: provenance must be a JSON object")
    try:
        config = GPTConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: model: {err}") from None
    apply_budget(budget, config, where)
    try:
        tokenizer = tokenizer_from_spec(meta["tokenizer"], files)
    except TokenizerError as err:
        raise CheckpointError(f"{where}: tokenizer: {err}") from None
    check_vocab(tokenizer, config, where)
    state = read_safetensors(files, WEIGHTS, config)
    model = build_model(config, state, files.where(WEIGHTS))
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        config=config,
        source_format=FORMAT,
        path=files.folder,
        provenance=dict(provenance),
    )
