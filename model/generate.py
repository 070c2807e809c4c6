"""The naive reference generator: nanoGPT's ``generate`` loop, kept obviously correct.

At every step it re-runs the whole context, cropped to the last ``block_size`` tokens, through the
full (cache-free) forward, and samples the next token. It is slow on purpose: it is the oracle that
every faster path (KV cache, continuous batching, sliding window) is tested against.
"""

from __future__ import annotations

import torch

from model.gpt import GPT
from model.sampling import mask_padded_vocab, random_seed, sample


@torch.no_grad()
def reference_generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
    stop_token_ids: tuple[int, ...] = (),
) -> list[int]:
    """Generate ``max_new_tokens`` tokens after ``prompt`` (token ids); returns only the new ones.

    ``temperature`` 0 is greedy; the t-th draw uses ``model.sampling.counter_uniforms(seed, t)``,
    as the engine does. ``vocab_size`` (the tokenizer's) masks padded embedding rows.
    Generation stops early after emitting a token in ``stop_token_ids``.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    model.eval()
    device = next(model.parameters()).device
    block_size = model.config.block_size
    seeds = torch.tensor([random_seed() if seed is None else seed])
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    new_tokens: list[int] = []
    params = dict(
        temperature=torch.tensor([float(temperature)]),
        top_k=None if top_k is None else torch.tensor([int(top_k)]),
        top_p=None if top_p is None else torch.tensor([float(top_p)]),
        min_p=None if min_p is None else torch.tensor([float(min_p)]),
    )
    for step in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]  # crop the context
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :].float().cpu()
        if vocab_size is not None:
            logits = mask_padded_vocab(logits, vocab_size)
        next_id = sample(logits, seeds=seeds, counters=torch.tensor([step]), **params)
        token = int(next_id[0])
        new_tokens.append(token)
        idx = torch.cat((idx, torch.tensor([[token]], device=device)), dim=1)
        if token in stop_token_ids:
            break
    return new_tokens
