"""``python -m trainer sample``: a quick look at what a checkpoint writes."""

from __future__ import annotations

from pathlib import Path

from model.checkpoint import load_checkpoint
from model.generate import reference_generate
from trainer.errors import TrainerError


def sample_text(
    checkpoint: Path,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    device: str = "cpu",
) -> str:
    """The prompt followed by ``max_tokens`` sampled tokens (nanoGPT's crop-the-context loop)."""
    if max_tokens < 0:
        raise TrainerError(f"--max-tokens must be >= 0, got {max_tokens}")
    ckpt = load_checkpoint(checkpoint, device=device)
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
