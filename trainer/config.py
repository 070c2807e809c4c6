"""Frozen configuration of a training run, one dataclass per concern, and the presets.

A run is described by a flat mapping of hyperparameter names (the command line's flags, with
``-`` turned into ``_``). ``build_train_spec`` layers ``DEFAULTS`` < preset < explicit values and
splits the result into ``ModelShape``, ``OptimConfig`` and ``LoopConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from model.config import GPTConfig


@dataclass(frozen=True)
class ModelShape:
    """The network's shape; the vocabulary size comes from the data's tokenizer."""

    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.2
    bias: bool = False

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            block_size=self.block_size,
            vocab_size=vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
            bias=self.bias,
        )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule: linear warmup, then cosine decay to ``min_lr``."""

    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: decay over the whole run (max_iters)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass(frozen=True)
class LoopConfig:
    """How long to train, on what, and how often to evaluate and checkpoint."""

    batch_size: int = 64
    grad_accum_steps: int = 1
    max_iters: int = 5000
    eval_interval: int = 250
    eval_iters: int = 200
    seed: int = 1337
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on a bf16-capable GPU, else float32
    compile: bool = False
    peak_flops: float | None = None  # per device, for MFU; None: measured at start-up
    save_dtype: str = "float32"  # dtype of the best/ checkpoint's weights


@dataclass(frozen=True)
class TrainSpec:
    """Everything a training run needs: shape, optimizer, loop, and which preset it came from."""

    model: ModelShape
    optim: OptimConfig
    loop: LoopConfig
    preset: str | None = None

    @property
    def lr_decay_iters(self) -> int:
        return self.optim.lr_decay_iters or self.loop.max_iters

    def flat(self) -> dict[str, Any]:
        """All hyperparameters as one flat dict (what provenance records)."""
        out: dict[str, Any] = {"preset": self.preset}
        for part in (self.model, self.optim, self.loop):
            out.update(dataclasses.asdict(part))
        return out


def _field_defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in (ModelShape, OptimConfig, LoopConfig):
        out.update({f.name: f.default for f in dataclasses.fields(cls)})
    return out


DEFAULTS: dict[str, Any] = _field_defaults()

# nanoGPT's config/train_shakespeare_char.py (its GPU recipe; val loss 1.4697 on an A100).
SHAKESPEARE_CHAR = dict(
    n_layer=6,
    n_head=6,
    n_embd=384,
    block_size=256,
    dropout=0.2,
    bias=False,
    batch_size=64,
    grad_accum_steps=1,
    learning_rate=1e-3,
    min_lr=1e-4,
    max_iters=5000,
    lr_decay_iters=5000,
    warmup_iters=100,
    beta2=0.99,
    weight_decay=0.1,
    eval_interval=250,
    eval_iters=200,
)

# The recipe behind weights/shakespeare-char/: chosen by measurement to finish in well under an
# hour on a shared 2-core CPU (see weights/README.md).
CPU_SMALL = dict(
    n_layer=4,
    n_head=4,
    n_embd=192,
    block_size=128,
    dropout=0.0,
    bias=False,
    batch_size=32,
    grad_accum_steps=1,
    learning_rate=2e-3,
    min_lr=2e-4,
    max_iters=2000,
    lr_decay_iters=None,
    warmup_iters=100,
    beta2=0.99,
    weight_decay=0.1,
    eval_interval=250,
    eval_iters=50,
    device="cpu",
    dtype="float32",
)

PRESETS: dict[str, dict[str, Any]] = {"shakespeare-char": SHAKESPEARE_CHAR, "cpu-small": CPU_SMALL}


def build_train_spec(preset: str | None = None, **overrides: Any) -> TrainSpec:
    """Layer DEFAULTS < PRESETS[preset] < overrides (None values ignored); unknown keys are errors."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown hyperparameters: {', '.join(unknown)}")
    values = dict(DEFAULTS)
    values.update(PRESETS.get(preset, {}) if preset else {})
    values.update({k: v for k, v in overrides.items() if v is not None})

    def pick(cls):
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    spec = TrainSpec(
        model=pick(ModelShape), optim=pick(OptimConfig), loop=pick(LoopConfig), preset=preset
    )
    _validate(spec)
    return spec


def _validate(spec: TrainSpec) -> None:
    loop, optim = spec.loop, spec.optim
    for name in ("batch_size", "grad_accum_steps", "max_iters", "eval_interval", "eval_iters"):
        if getattr(loop, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(loop, name)}")
    if optim.learning_rate <= 0 or optim.min_lr < 0 or optim.min_lr > optim.learning_rate:
        raise ValueError("need 0 <= min_lr <= learning_rate and learning_rate > 0")
    if loop.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {loop.dtype!r}")
    if loop.save_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(
            f"save_dtype must be float32, float16 or bfloat16, got {loop.save_dtype!r}"
        )
    spec.model.gpt_config(vocab_size=1)  # GPTConfig checks the shape (n_embd % n_head, ...)
