"""AdamW with decoupled weight decay on 2-D weights only, and the warmup + cosine schedule."""

from __future__ import annotations

import inspect
import math

import torch

from trainer.config import OptimConfig


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW where matmul weights and embeddings decay and biases / LayerNorm gains do not.

    Parameters are deduplicated by identity, so the tied ``lm_head`` / ``wte`` weight appears once
    (nanoGPT's ``configure_optimizers``).
    """
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {}
    # One fused kernel for the whole update: nanoGPT uses it on CUDA; torch >= 2.4 has it on CPU
    # too, where it beats foreach (docs/BENCHMARKS.md, "Training throughput").
    if (
        device_type in ("cuda", "cpu")
        and "fused" in inspect.signature(torch.optim.AdamW).parameters
    ):
        extra["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **extra)


def learning_rate(step: int, cfg: OptimConfig, decay_iters: int) -> float:
    """Linear warmup for ``warmup_iters`` steps, then cosine decay to ``min_lr`` at ``decay_iters``."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
