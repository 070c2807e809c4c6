"""Hugging Face GPT-2 folders, in and out.

HF stores the attention and MLP projections as ``Conv1D`` with weights shaped (in, out), the
transpose of ``nn.Linear``; both directions transpose those four matrices. HF GPT-2 always has
biases, so a ``bias=False`` model exports zeros there (the same function).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.checkpoint.atomic import atomic_folder
from model.checkpoint.common import Checkpoint, CheckpointError, build_model
from model.checkpoint.hf_tokenizer import read_char_tokenizer, write_tokenizer_files
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import GPT2_EOT_ID, TiktokenTokenizer, Tokenizer

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def is_huggingface(meta: object) -> bool:
    return isinstance(meta, dict) and meta.get("model_type") == "gpt2"


def load_huggingface(folder: Path, meta: dict) -> Checkpoint:
    cfg_file = folder / "config.json"
    act = meta.get("activation_function", "gelu_new")
    if act not in _ACT_IN:
        raise CheckpointError(f"{cfg_file}: unsupported activation_function {act!r}")
    eps = meta.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise CheckpointError(f"{cfg_file}: layer_norm_epsilon {eps} unsupported (GPT-2 uses 1e-5)")
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
    except KeyError as err:
        raise CheckpointError(f"{cfg_file}: missing key {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_file}: {err}") from None
    raw, weights = _read_hf_weights(folder)
    state = {}
    for key, tensor in raw.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old HF causal-mask buffers
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        state[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor
    model = build_model(config, state, weights)
    provenance = {"converted_from": "huggingface", "name_or_path": meta.get("_name_or_path")}
    tokenizer = read_char_tokenizer(folder / "tokenizer.json") or TiktokenTokenizer.by_name("gpt2")
    return Checkpoint(model, tokenizer, config, "huggingface", folder, provenance)


def _read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        try:
            return load_file(str(st)), st
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{st}: unreadable or truncated safetensors file ({err})") from None
    if pt.is_file():
        try:
            return torch.load(pt, map_location="cpu", weights_only=True), pt
        except Exception as err:
            raise CheckpointError(f"{pt}: unreadable or refused torch file ({err})") from None
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin in this GPT-2 folder")


def export_huggingface(model: GPT, out: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder (config.json + model.safetensors).

    With ``tokenizer`` the folder also gets the tokenizer files ``AutoTokenizer`` reads (so
    vLLM or transformers need nothing else), and its end-of-text id as ``eos_token_id``.
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
    eos_token_id = GPT2_EOT_ID if tokenizer is None else tokenizer.eot_id
    if eos_token_id is not None and eos_token_id >= cfg.vocab_size:
        eos_token_id = None
    hf_config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
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
