"""What every checkpoint format converts into: a loaded model, its tokenizer and provenance.

Every loader follows one order, so nothing is allocated from numbers that were not checked:
config (types, ranges) -> memory budget -> tokenizer (vocab fits the model) -> tensor shapes ->
weights -> model. ``build_model`` is the last two steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoint.files import CheckpointError
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import Tokenizer

__all__ = ["Checkpoint", "CheckpointError", "build_model", "check_shapes", "check_vocab"]


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its tokenizer, config and provenance."""

    model: GPT
    tokenizer: Tokenizer
    config: GPTConfig
    source_format: str  # "gptserve", "nanogpt" or "huggingface"
    path: Path
    provenance: dict[str, Any] = field(default_factory=dict)


def check_vocab(tokenizer: Tokenizer, config: GPTConfig, source: Path) -> None:
    """A token id the model has no embedding for would fail inside the engine: refuse it here."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size} embeddings (vocab_size)"
        )


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor ``GPT(config)`` holds, by nanoGPT name (built on the meta device: no memory)."""
    with torch.device("meta"):
        skeleton = GPT(config)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def check_shapes(
    config: GPTConfig, shapes: Mapping[str, tuple[int, ...]], source: Path
) -> dict[str, tuple[int, ...]]:
    """Refuse missing, unexpected or mis-shaped tensors (``lm_head.weight`` may be absent: it is
    tied to ``transformer.wte.weight``). Run on a file's header, before its tensors are read."""
    expected = expected_shapes(config)
    shapes = dict(shapes)
    if "lm_head.weight" not in shapes and "transformer.wte.weight" in shapes:
        shapes["lm_head.weight"] = shapes["transformer.wte.weight"]
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_preview(unexpected)}")
        raise CheckpointError(f"{source}: {'; '.join(parts)}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(shapes[name])}, the config needs {shape}"
            )
    return expected


def build_model(config: GPTConfig, state_dict: Mapping[str, Any], source: Path) -> GPT:
    """Instantiate ``GPT(config)`` and load ``state_dict`` (nanoGPT names), checking every shape,
    type and value first."""
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: the state dict must map tensor names to tensors")
    check_shapes(config, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    state = dict(state_dict)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor {name} has NaN or infinite values")
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
