"""nanoGPT's ``ckpt.pt`` (+ ``meta.pkl`` for character vocabularies), read without running code.

The checkpoint is opened with ``torch.load(weights_only=True)``; ``meta.pkl`` with an unpickler that
refuses every global, so plain dicts, strings and ints load and anything that would import or call
Python code is refused.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from model.checkpoint.common import Checkpoint, CheckpointError, build_model
from model.config import GPTConfig
from model.tokenizer import CharTokenizer, TiktokenTokenizer, TokenizerError

_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
_COMPILE_PREFIX = "_orig_mod."


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any global (class, function) is a refusal."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_meta_pkl(file: Path) -> CharTokenizer:
    """The character vocabulary of a nanoGPT ``meta.pkl`` ({'vocab_size', 'itos', 'stoi'})."""
    try:
        meta = _DataOnlyUnpickler(io.BytesIO(file.read_bytes())).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file}: refused, the pickle tries to load Python objects, not plain data ({err})"
        ) from None
    except Exception as err:  # truncated or garbage pickles raise many types
        raise CheckpointError(f"{file}: not a readable meta.pkl ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("itos"), dict):
        raise CheckpointError(f"{file}: expected a dict with an 'itos' mapping")
    itos = meta["itos"]
    try:
        chars = [itos[i] for i in range(len(itos))]
        return CharTokenizer(chars)
    except (KeyError, TokenizerError) as err:
        raise CheckpointError(f"{file}: 'itos' is not a contiguous character vocabulary ({err})") from None


def load_nanogpt(file: Path) -> Checkpoint:
    """Load nanoGPT's ``ckpt.pt``; ``meta.pkl`` beside it gives a char vocabulary, else GPT-2 BPE."""
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{file}: refused, the file holds Python objects that would run code when loaded "
            f"(only tensors and plain data are accepted): {first_line}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable or truncated torch file ({err})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{file}: not a nanoGPT checkpoint (needs 'model' and 'model_args')")
    args = ckpt["model_args"]
    try:
        config = GPTConfig(**{k: args[k] for k in _MODEL_ARGS if k in args})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: bad model_args ({err})") from None
    state = {}
    for key, tensor in ckpt["model"].items():
        key = key.removeprefix(_COMPILE_PREFIX)
        if key.endswith(".attn.bias") and tensor.dim() == 4:
            continue  # nanoGPT's causal-mask buffer (only present without flash attention)
        state[key] = tensor
    model = build_model(config, state, file)
    meta = file.parent / "meta.pkl"
    tokenizer = read_meta_pkl(meta) if meta.is_file() else TiktokenTokenizer.by_name("gpt2")
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{file}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size} embeddings"
        )
    provenance = {
        "iterations": ckpt.get("iter_num"),
        "val_loss": _as_float(ckpt.get("best_val_loss")),
        "dataset": (ckpt.get("config") or {}).get("dataset"),
        "converted_from": "nanogpt",
    }
    return Checkpoint(model, tokenizer, config, "nanogpt", file, provenance)


def _as_float(value) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None
