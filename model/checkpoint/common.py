"""What every checkpoint format converts into: a loaded model, its tokenizer and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import Tokenizer


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its tokenizer, config and provenance."""

    model: GPT
    tokenizer: Tokenizer
    config: GPTConfig
    source_format: str  # "gptserve", "nanogpt" or "huggingface"
    path: Path
    provenance: dict[str, Any] = field(default_factory=dict)


def build_model(config: GPTConfig, state_dict: dict[str, torch.Tensor], source: Path) -> GPT:
    """Instantiate ``GPT(config)`` and load ``state_dict`` (nanoGPT names), checking every shape.

    ``lm_head.weight`` may be absent (it is tied to ``transformer.wte.weight``).
    """
    with torch.device("meta"):
        skeleton = GPT(config)
    expected = {k: v.shape for k, v in skeleton.state_dict().items()}
    state = dict(state_dict)
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_preview(unexpected)}")
        raise CheckpointError(f"{source}: {'; '.join(parts)}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                f"the config needs {tuple(shape)}"
            )
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
