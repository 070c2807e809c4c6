"""The naive reference generator: nanoGPT's ``generate`` loop, kept obviously correct.

At every step it re-runs the whole context, cropped to the last ``block_size`` tokens, through the
full (cache-free) forward, and picks the next token with the sampling oracle
(``model.reference_sampling``, written from the definitions and sharing no code with the
engine's sampler). It is slow on purpose: it is the oracle that every faster path (KV cache,
continuous batching, sliding window, the vectorised sampler) is tested against.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model.gpt import GPT
from model.reference_sampling import ReferenceParams, ReferenceToken, next_token
from model.sampling import random_seed


@torch.no_grad()
def reference_steps(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: Mapping[int, float] | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
    stop_token_ids: tuple[int, ...] = (),
    logprobs: int | None = None,
) -> list[ReferenceToken]:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` (token ids), one oracle step
    each (the token, and its logprob and ``logprobs`` alternatives when asked).

    ``temperature`` 0 is greedy; the t-th draw uses the counter-based uniform of (seed, t), as
    the engine does. ``vocab_size`` (the tokenizer's) masks padded embedding rows. Generation
    stops early after emitting a token in ``stop_token_ids``.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    model.eval()
    device = next(model.parameters()).device
    block_size = model.config.block_size
    seed = random_seed() if seed is None else seed
    params = ReferenceParams(
        temperature=float(temperature),
        top_k=int(top_k or 0),
        top_p=1.0 if top_p is None else float(top_p),
        min_p=float(min_p or 0.0),
        presence_penalty=float(presence_penalty),
        frequency_penalty=float(frequency_penalty),
        repetition_penalty=float(repetition_penalty),
        logit_bias=tuple((logit_bias or {}).items()),
    )
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    steps: list[ReferenceToken] = []
    generated: list[int] = []
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]  # crop the context
        logits, _ = model(idx_cond)
        step = next_token(logits[0, -1].float().tolist(), params, prompt=prompt,
                          generated=generated, seed=seed, vocab_size=vocab_size,
                          logprobs=logprobs)
        steps.append(step)
        generated.append(step.token_id)
        idx = torch.cat((idx, torch.tensor([[step.token_id]], device=device)), dim=1)
        if step.token_id in stop_token_ids:
            break
    return steps


def reference_generate(model: GPT, prompt: list[int], max_new_tokens: int,
                       **options) -> list[int]:
    """The new token ids of ``reference_steps(model, prompt, max_new_tokens, **options)``."""
    return [step.token_id for step in reference_steps(model, prompt, max_new_tokens, **options)]
