"""Frozen configuration of a training run, one dataclass per concern, and the presets.

A run is described by a flat mapping of hyperparameter names (the command line's flags, with
``-`` turned into ``_``). ``build_train_spec`` layers ``DEFAULTS`` < preset < explicit values and
splits the result into ``ModelShape``, ``OptimConfig``, ``LoopConfig`` and ``LogConfig``.
``resume_spec`` rebuilds a run's spec from the hyperparameters its checkpoint recorded, with only
the explicitly named values overriding them (nanoGPT's ``init_from='resume'``).

This module imports no torch: the command line's ``--help`` is built from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from model.flags import flag

if TYPE_CHECKING:
    from model.config import GPTConfig


def _param(default: Any, help: str) -> Any:
    """A config field whose ``help`` becomes its command-line flag's help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelShape:
    """The network's shape; the vocabulary size comes from the data's tokenizer."""

    n_layer: int = _param(6, "transformer blocks")
    n_head: int = _param(6, "attention heads per block (must divide --n-embd)")
    n_embd: int = _param(384, "embedding width")
    block_size: int = _param(256, "context window in tokens")
    dropout: float = _param(0.2, "dropout probability while training (0 disables)")
    bias: bool = _param(False, "biases in the Linear and LayerNorm layers (GPT-2 has them)")

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        from model.config import GPTConfig  # imports torch via model/: not at --help time

        return GPTConfig(
            block_size=self.block_size,
            vocab_size=vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
            bias=self.bias,
        )


# What a resumed run cannot change: the weights' shape. Dropout can change (nanoGPT allows it).
FIXED_ON_RESUME = ("n_layer", "n_head", "n_embd", "block_size", "bias")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule: linear warmup, then cosine decay to ``min_lr``."""

    learning_rate: float = _param(1e-3, "peak learning rate, reached after the warmup")
    min_lr: float = _param(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = _param(100, "steps of linear learning-rate warmup")
    lr_decay_iters: int | None = _param(
        None, "step at which the cosine decay reaches --min-lr (default: --max-iters)"
    )
    weight_decay: float = _param(0.1, "AdamW weight decay on matmul and embedding weights")
    beta1: float = _param(0.9, "AdamW beta1")
    beta2: float = _param(0.99, "AdamW beta2")
    grad_clip: float = _param(1.0, "clip the gradient's global norm to this (0 disables)")


@dataclass(frozen=True)
class LoopConfig:
    """How long to train, on what, and how often to evaluate and checkpoint."""

    batch_size: int = _param(64, "sequences per micro-batch, per process")
    grad_accum_steps: int = _param(1, "micro-batches accumulated into one optimizer step")
    max_iters: int = _param(5000, "optimizer steps in the whole run")
    eval_interval: int = _param(250, "evaluate and checkpoint every this many steps")
    eval_iters: int = _param(200, "batches per split in each evaluation")
    eval_at_start: bool = _param(
        True, "evaluate (and save best/) at step 0, before training; --no-eval-at-start skips it"
    )
    seed: int = _param(1337, "seed of the initial weights, the data order and dropout")
    device: str = _param("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: str = _param(
        "auto", "float32, bfloat16, float16 (autocast), or auto (bf16 on a bf16 GPU, else fp32)"
    )
    compile: bool = _param(False, "torch.compile the model")
    peak_flops: float | None = _param(
        None, "peak FLOP/s per device for MFU (default: trainer/flops.py's table)"
    )
    save_dtype: str = _param("float32", "dtype of best/'s weights: float32, float16, bfloat16")


@dataclass(frozen=True)
class LogConfig:
    """Where per-step metrics go, and how often: log.jsonl always, TensorBoard and W&B if asked."""

    log_interval: int = _param(10, "write per-step metrics every this many steps")
    tensorboard: bool = _param(True, "also write OUT/tensorboard/ when tensorboard is installed")
    wandb: bool = _param(False, "also log to Weights & Biases (needs the wandb package)")
    wandb_project: str = _param("gptserve", "W&B project name")


@dataclass(frozen=True)
class TrainSpec:
    """Everything a training run needs: shape, optimizer, loop, logging, and its preset."""

    model: ModelShape
    optim: OptimConfig
    loop: LoopConfig
    log: LogConfig = LogConfig()
    preset: str | None = None

    @property
    def lr_decay_iters(self) -> int:
        return self.optim.lr_decay_iters or self.loop.max_iters

    def flat(self) -> dict[str, Any]:
        """All hyperparameters as one flat dict (what provenance records and resume reads)."""
        out: dict[str, Any] = {"preset": self.preset}
        for part in (self.model, self.optim, self.loop, self.log):
            out.update(dataclasses.asdict(part))
        return out


SECTIONS = (ModelShape, OptimConfig, LoopConfig, LogConfig)


def _field_defaults() -> dict[str, Any]:
    return {f.name: f.default for cls in SECTIONS for f in dataclasses.fields(cls)}


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

# A first run on a laptop-class or shared 2-core CPU: about 5 minutes (docs/TRAINING.md has the
# measured run), and text that already looks like its corpus. nanoGPT's CPU "baby GPT" shape.
CPU_TINY = {
    **CPU_SMALL,
    "n_embd": 128,
    "block_size": 64,
    "batch_size": 16,
    "max_iters": 1000,
    "warmup_iters": 50,
    "eval_interval": 200,
    "eval_iters": 20,
}

PRESETS: dict[str, dict[str, Any]] = {
    "shakespeare-char": SHAKESPEARE_CHAR,
    "cpu-small": CPU_SMALL,
    "cpu-tiny": CPU_TINY,
}


def build_train_spec(preset: str | None = None, **overrides: Any) -> TrainSpec:
    """Layer DEFAULTS < PRESETS[preset] < overrides (None values ignored); unknown keys are errors."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    _check_known(overrides)
    values = dict(DEFAULTS)
    values.update(PRESETS.get(preset, {}) if preset else {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _spec(values, preset)


def resume_spec(
    recorded: Mapping[str, Any], preset: str | None, overrides: Mapping[str, Any]
) -> tuple[TrainSpec, list[str]]:
    """The spec of a run being resumed, and one line per setting the caller changed.

    ``recorded`` is the flat hyperparameter dict the run's checkpoint holds (``TrainSpec.flat``).
    Only the values named in ``overrides`` (None: not named) replace it: a preset given again does
    not re-apply its values, so a 150-step run stays a 150-step run. Changing the model's shape, or
    naming a different preset, is an error.
    """
    _check_known(overrides)
    started_with = recorded.get("preset")
    if preset is not None and preset != started_with:
        origin = f"--preset {started_with}" if started_with else "no preset"
        raise ValueError(
            f"--preset {preset}: this run was started with {origin}; a resumed run keeps its own "
            "settings, so name only the flags you want to change"
        )
    values = dict(DEFAULTS)
    values.update({k: v for k, v in recorded.items() if k in DEFAULTS})
    notes = [
        f"ignored {k}={v!r} recorded by another trainer version"
        for k, v in recorded.items()
        if k not in DEFAULTS and k != "preset"
    ]
    for name, value in overrides.items():
        if value is None or value == values[name]:
            continue
        if name in FIXED_ON_RESUME:
            raise ValueError(
                f"{flag(name)} {value}: a resumed run keeps its model shape ({name} is "
                f"{values[name]!r}); start a new run (another --out) to train a different shape"
            )
        notes.append(f"override {flag(name)}: {values[name]!r} -> {value!r}")
        if name == "max_iters" and values["lr_decay_iters"] is None:
            notes.append(
                f"  the learning rate now decays to --min-lr at step {value} instead of "
                f"{values[name]}; pin it with --lr-decay-iters"
            )
        values[name] = value
    return _spec(values, started_with), notes


def _check_known(overrides: Mapping[str, Any]) -> None:
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown hyperparameters: {', '.join(unknown)}")


def _spec(values: Mapping[str, Any], preset: str | None) -> TrainSpec:
    def pick(cls):
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    spec = TrainSpec(
        model=pick(ModelShape),
        optim=pick(OptimConfig),
        loop=pick(LoopConfig),
        log=pick(LogConfig),
        preset=preset,
    )
    _validate(spec)
    return spec


def _validate(spec: TrainSpec) -> None:
    loop, optim = spec.loop, spec.optim
    for name in ("batch_size", "grad_accum_steps", "max_iters", "eval_interval", "eval_iters"):
        if getattr(loop, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(loop, name)}")
    if spec.log.log_interval <= 0:
        raise ValueError(f"log_interval must be positive, got {spec.log.log_interval}")
    if optim.learning_rate <= 0 or optim.min_lr < 0 or optim.min_lr > optim.learning_rate:
        raise ValueError("need 0 <= min_lr <= learning_rate and learning_rate > 0")
    if loop.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {loop.dtype!r}")
    if loop.save_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(
            f"save_dtype must be float32, float16 or bfloat16, got {loop.save_dtype!r}"
        )
    if loop.peak_flops is not None and loop.peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {loop.peak_flops}")
    spec.model.gpt_config(vocab_size=1)  # GPTConfig checks the shape (n_embd % n_head, ...)
