"""The network's shape: one frozen dataclass, shared by trainer, checkpoints and server."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("gelu", "gelu_tanh")
# Sanity bounds, far above any GPT-2-family model (GPT-2 XL: 48 layers, n_embd 1600, 50,257
# tokens, 1,024 positions). What fits in memory is checked separately, from these numbers,
# before anything is allocated (model.checkpoint.budget).
MAX_DIM = 2**31 - 1
MAX_LAYERS = 4096


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a nanoGPT / GPT-2 network.

    ``vocab_size`` is the embedding table's row count, which may be padded past the tokenizer's
    vocabulary (nanoGPT pads GPT-2's 50,257 to 50,304); padded rows are never sampled.
    ``activation`` is ``"gelu"`` (exact erf GELU, nanoGPT's ``nn.GELU()``) or ``"gelu_tanh"``
    (the tanh approximation OpenAI's GPT-2 and Hugging Face's ``gelu_new`` use).
    """

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"

    def __post_init__(self) -> None:
        # Types first: a config.json may say anything ("2", 1e9, true), and JSON gives floats for
        # 1e9; only real ints (not bools) are shapes.
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"GPTConfig.{name} must be an integer, got {value!r}")
            if not 0 < value <= MAX_DIM:
                raise ValueError(
                    f"GPTConfig.{name} must be a positive integer at most {MAX_DIM}, got {value!r}"
                )
        if self.n_layer > MAX_LAYERS:
            raise ValueError(f"GPTConfig.n_layer must be at most {MAX_LAYERS}, got {self.n_layer}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool):
            raise ValueError(f"GPTConfig.dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be true or false, got {self.bias!r}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a dict; unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise ValueError(f"the model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {', '.join(unknown)}")
        return cls(**data)
