"""``python -m trainer sample``: a quick look at what a checkpoint writes."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint
from model.generate import reference_generate
from model.threads import plan_threads
from model.tuner import ThreadTuner
from trainer.errors import TrainerError


def sample_text(
    checkpoint: Path,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    device: str = "cpu",
    threads: int | None = None,
) -> str:
    """The prompt followed by ``max_tokens`` sampled tokens (nanoGPT's crop-the-context loop),
    on the server's CPU thread plan (``threads``: fixed; None: adaptive, see model/threads.py)."""
    if max_tokens < 0:
        raise TrainerError(f"--max-tokens must be >= 0, got {max_tokens}")
    try:
        plan = plan_threads(threads)
    except ValueError as err:
        raise TrainerError(str(err)) from None
    ckpt = load_checkpoint(checkpoint, device=device)
    torch.set_num_threads(plan.threads)
    if plan.adaptive and device == "cpu":
        tune_threads(ckpt.model, ThreadTuner(plan.threads))
    ids = ckpt.tokenizer.encode(prompt)  # TokenizerError names a character outside the vocab
    if not ids:
        raise TrainerError("the prompt is empty after tokenization; give at least one token")
    vocab = ckpt.tokenizer.vocab_size
    out = reference_generate(
        ckpt.model,
        ids,
        max_tokens,
        temperature=temperature,
        top_k=None if top_k is None else min(top_k, vocab),
        seed=seed,
        vocab_size=vocab,
    )
    return ckpt.tokenizer.decode(ids + out)


def tune_threads(model: torch.nn.Module, tuner: ThreadTuner) -> None:
    """Time every forward of ``model`` and run the next on the tuner's thread count (a forward
    of the crop-the-context loop is one step; its shape is the context length's power of two)."""
    started: list[float] = []

    def before(module: torch.nn.Module, args: tuple) -> None:
        if torch.get_num_threads() != tuner.threads:
            torch.set_num_threads(tuner.threads)
        started.append(time.perf_counter())

    def after(module: torch.nn.Module, args: tuple, output: object) -> None:
        tuner.observe(args[0].shape[-1].bit_length(), time.perf_counter() - started.pop())

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
