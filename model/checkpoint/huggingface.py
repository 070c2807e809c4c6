"""Hugging Face GPT-2 folders, in and out.

HF stores the attention and MLP projections as ``Conv1D`` with weights shaped (in, out), the
transpose of ``nn.Linear``; both directions transpose those four matrices. HF GPT-2 always has
biases, so a ``bias=False`` model exports zeros there (the same function).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.checkpoint.atomic import atomic_folder
from model.checkpoint.budget import Budget, apply_budget
from model.checkpoint.common import Checkpoint, CheckpointError, build_model, check_vocab
from model.checkpoint.files import CheckpointFiles
from model.checkpoint.hf_tokenizer import read_hf_tokenizer, write_tokenizer_files
from model.checkpoint.tensors import read_safetensors, read_torch, tensor_dict
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import GPT2_EOT_ID, TiktokenTokenizer, Tokenizer

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# transformers' GPT2Config switches that change the computation, with the value GPT-2 uses.
_FLAGS = {
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


def is_huggingface(meta: object) -> bool:
    return isinstance(meta, dict) and meta.get("model_type") == "gpt2"


def hf_config(meta: dict, where: Path) -> GPTConfig:
    """The ``GPTConfig`` a Hugging Face GPT-2 ``config.json`` describes; every field the network
    depends on is type-checked, and what this network cannot compute is refused by name."""
    act = meta.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in _ACT_IN:
        raise CheckpointError(f"{where}: unsupported activation_function {act!r:.60}")
    eps = meta.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise CheckpointError(f"{where}: layer_norm_epsilon must be a number, got {eps!r:.60}")
    if abs(eps - 1e-5) > 1e-12:
        raise CheckpointError(f"{where}: layer_norm_epsilon {eps} unsupported (GPT-2 uses 1e-5)")
    for key, supported in _FLAGS.items():
        if meta.get(key, supported) is not supported:
            raise CheckpointError(f"{where}: {key}={meta[key]!r:.60} is not supported (GPT-2: "
                                  f"{str(supported).lower()})")  # fmt: skip
    missing = [k for k in ("vocab_size", "n_layer", "n_head", "n_embd") if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r}")
    try:
        config = GPTConfig(
            block_size=meta.get("n_positions", meta.get("n_ctx", 1024)),
            vocab_size=meta["vocab_size"],
            n_layer=meta["n_layer"],
            n_head=meta["n_head"],
            n_embd=meta["n_embd"],
            dropout=0.0,
            bias=True,
            activation=_ACT_IN[act],
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None
    n_inner = meta.get("n_inner")
    if n_inner is not None and n_inner != 4 * config.n_embd:
        raise CheckpointError(
            f"{where}: n_inner={n_inner!r:.60} is not supported (the MLP is 4 x n_embd wide)"
        )
    return config


def load_huggingface(files: CheckpointFiles, meta: dict, budget: Budget) -> Checkpoint:
    where = files.where("config.json")
    config = hf_config(meta, where)
    apply_budget(budget, config, where)
    # Weights-only GPT-2 folders (no tokenizer files) use GPT-2's BPE, as transformers' gpt2 does;
    # tokenizer files that describe something else are read, or refused, never ignored.
    tokenizer = read_hf_tokenizer(files) or TiktokenTokenizer.by_name("gpt2")
    check_vocab(tokenizer, config, where)
    state, weights = _read_hf_weights(files, config)
    model = build_model(config, state, weights)
    name = meta.get("_name_or_path")
    provenance = {
        "converted_from": "huggingface",
        "name_or_path": name if isinstance(name, str) else None,
    }
    return Checkpoint(model, tokenizer, config, "huggingface", files.folder, provenance)


def _hf_name(key: str) -> str | None:
    if key.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # old HF causal-mask buffers
    return key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D)


def _read_hf_weights(
    files: CheckpointFiles, config: GPTConfig
) -> tuple[dict[str, torch.Tensor], Path]:
    if files.exists("model.safetensors"):
        state = read_safetensors(files, "model.safetensors", config, _hf_name, _is_conv1d)
        return state, files.where("model.safetensors")
    if files.exists("pytorch_model.bin"):
        where = files.where("pytorch_model.bin")
        raw = tensor_dict(read_torch(files, "pytorch_model.bin"), where, "pytorch_model.bin")
        state = {}
        for key, tensor in raw.items():
            name = _hf_name(key)
            if name is not None:
                state[name] = tensor.t().contiguous() if _is_conv1d(name) else tensor
        return state, where
    raise CheckpointError(
        f"{files.folder}: no model.safetensors or pytorch_model.bin in this GPT-2 folder"
    )


def export_huggingface(model: GPT, out: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder (config.json + model.safetensors).

    With ``tokenizer`` the folder also gets the tokenizer files ``AutoTokenizer`` reads (so
    vLLM or transformers need nothing else), its end-of-text id as ``eos_token_id``, and only
    as many embedding rows as it has tokens (padded rows are dropped).
    """
    cfg = model.config
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        tensor = tensor.detach().float().cpu()
        state[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor.contiguous()
    if not cfg.bias:  # HF GPT-2 always has biases; zeros compute the same function
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            state[p + "ln_1.bias"] = torch.zeros(cfg.n_embd)
            state[p + "ln_2.bias"] = torch.zeros(cfg.n_embd)
            state[p + "attn.c_attn.bias"] = torch.zeros(3 * cfg.n_embd)
            state[p + "attn.c_proj.bias"] = torch.zeros(cfg.n_embd)
            state[p + "mlp.c_fc.bias"] = torch.zeros(4 * cfg.n_embd)
            state[p + "mlp.c_proj.bias"] = torch.zeros(cfg.n_embd)
        state["transformer.ln_f.bias"] = torch.zeros(cfg.n_embd)
    vocab_size = cfg.vocab_size
    if tokenizer is not None and tokenizer.vocab_size < vocab_size:
        # nanoGPT pads GPT-2's 50,257 tokens to 50,304 rows; transformers would sample the padded
        # ids (they are no tokens), so the export keeps exactly the tokenizer's rows.
        vocab_size = tokenizer.vocab_size
        state["transformer.wte.weight"] = state["transformer.wte.weight"][:vocab_size].clone()
    eos_token_id = GPT2_EOT_ID if tokenizer is None else tokenizer.eot_id
    if eos_token_id is not None and eos_token_id >= vocab_size:
        eos_token_id = None
    hf_config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": _ACT_OUT[cfg.activation],
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    out = Path(out)
    with atomic_folder(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp)
    return out
