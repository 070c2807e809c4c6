"""The GPT network, its KV cache, sampling, tokenizers and checkpoint I/O.

Names are imported lazily (``from model import GPT`` loads torch then), so the torch-free parts
(``model.threads``, ``model.tuner``, ``model.config``) import without torch: an entry point can
set OpenMP's environment before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "Checkpoint": "model.checkpoint",
    "CheckpointError": "model.checkpoint",
    "export_huggingface": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "GPTConfig": "model.config",
    "reference_generate": "model.generate",
    "GPT": "model.gpt",
    "KVCache": "model.kv_cache",
    "CharTokenizer": "model.tokenizer",
    "IncrementalDecoder": "model.tokenizer",
    "TiktokenTokenizer": "model.tokenizer",
    "Tokenizer": "model.tokenizer",
    "TokenizerError": "model.tokenizer",
    "tokenizer_from_spec": "model.tokenizer",
}
__all__ = [
    "GPT",
    "CharTokenizer",
    "Checkpoint",
    "CheckpointError",
    "GPTConfig",
    "IncrementalDecoder",
    "KVCache",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerError",
    "export_huggingface",
    "load_checkpoint",
    "reference_generate",
    "save_checkpoint",
    "tokenizer_from_spec",
]

if TYPE_CHECKING:
    from model.checkpoint import (
        Checkpoint,
        CheckpointError,
        export_huggingface,
        load_checkpoint,
        save_checkpoint,
    )
    from model.config import GPTConfig
    from model.generate import reference_generate
    from model.gpt import GPT
    from model.kv_cache import KVCache
    from model.tokenizer import (
        CharTokenizer,
        IncrementalDecoder,
        TiktokenTokenizer,
        Tokenizer,
        TokenizerError,
        tokenizer_from_spec,
    )


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
