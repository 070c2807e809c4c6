"""nanoGPT's ``ckpt.pt`` (+ ``meta.pkl`` for character vocabularies), read without running code.

The checkpoint is opened with ``torch.load(weights_only=True, mmap=True)``; ``meta.pkl`` with an
unpickler that refuses every global, so plain dicts, strings and ints load and anything that
would import or call Python code is refused. Every field is type-checked before it is used.
"""

from __future__ import annotations

import io
import pickle

import torch

from model.checkpoint.budget import Budget, apply_budget
from model.checkpoint.common import Checkpoint, CheckpointError, build_model, check_vocab
from model.checkpoint.files import CheckpointFiles
from model.checkpoint.tensors import read_torch, tensor_dict
from model.config import GPTConfig
from model.tokenizer import CharTokenizer, TiktokenTokenizer, Tokenizer, TokenizerError

_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
_COMPILE_PREFIX = "_orig_mod."
META = "meta.pkl"


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any global (class, function) is a refusal."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_meta_pkl(files: CheckpointFiles) -> CharTokenizer:
    """The character vocabulary of a nanoGPT ``meta.pkl`` ({'vocab_size', 'itos', 'stoi'})."""
    where = files.where(META)
    try:
        meta = _DataOnlyUnpickler(io.BytesIO(files.read(META))).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{where}: refused, the pickle tries to load Python objects, not plain data ({err})"
        ) from None
    except CheckpointError:
        raise
    except Exception as err:  # truncated or garbage pickles raise many types
        raise CheckpointError(f"{where}: not a readable meta.pkl ({type(err).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("itos"), dict):
        raise CheckpointError(f"{where}: expected a dict with an 'itos' mapping")
    itos = meta["itos"]
    ids = sorted(k for k in itos if isinstance(k, int) and not isinstance(k, bool))
    if ids != list(range(len(itos))) or any(
        not isinstance(itos[i], str) or len(itos[i]) != 1 for i in ids
    ):
        raise CheckpointError(
            f"{where}: 'itos' must map the ids 0..{len(itos) - 1} to distinct single characters"
        )
    if "vocab_size" in meta and meta["vocab_size"] != len(itos):
        raise CheckpointError(f"{where}: vocab_size {meta['vocab_size']!r} but 'itos' has {len(itos)}")
    try:
        return CharTokenizer([itos[i] for i in ids])
    except TokenizerError as err:
        raise CheckpointError(f"{where}: 'itos': {err}") from None


def load_nanogpt(
    files: CheckpointFiles, name: str, budget: Budget, *, follow: bool = False
) -> Checkpoint:
    """Load nanoGPT's ``ckpt.pt``; ``meta.pkl`` beside it gives a char vocabulary, else GPT-2 BPE."""
    where = files.where(name)
    ckpt = read_torch(files, name, follow=follow)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{where}: not a nanoGPT checkpoint (needs 'model' and 'model_args')")
    args = ckpt["model_args"]
    if not isinstance(args, dict):
        raise CheckpointError(f"{where}: 'model_args' must be a dict, got {type(args).__name__}")
    try:
        config = GPTConfig(**{k: args[k] for k in _MODEL_ARGS if k in args})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: bad model_args ({err})") from None
    apply_budget(budget, config, where)
    tokenizer: Tokenizer = (
        read_meta_pkl(files) if files.exists(META) else TiktokenTokenizer.by_name("gpt2")
    )
    check_vocab(tokenizer, config, where)
    state = {}
    for key, tensor in tensor_dict(ckpt["model"], where, "'model'").items():
        key = key.removeprefix(_COMPILE_PREFIX)
        if key.endswith(".attn.bias") and tensor.dim() == 4:
            continue  # nanoGPT's causal-mask buffer (only present without flash attention)
        state[key] = tensor
    model = build_model(config, state, where)
    provenance = {
        "iterations": ckpt.get("iter_num") if isinstance(ckpt.get("iter_num"), int) else None,
        "val_loss": _as_float(ckpt.get("best_val_loss")),
        "dataset": _dataset(ckpt.get("config")),
        "converted_from": "nanogpt",
    }
    return Checkpoint(model, tokenizer, config, "nanogpt", where, provenance)


def _dataset(config: object) -> str | None:
    value = config.get("dataset") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def _as_float(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, bool):
        return None
    return float(value) if isinstance(value, (int, float)) else None
