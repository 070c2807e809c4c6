"""The GPT network, its KV cache, sampling, tokenizers and checkpoint I/O."""

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
