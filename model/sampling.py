"""Sampling as pure functions of (logits, per-row parameters, generators).

Every function takes a batch of logits ``(B, V)`` and per-row parameter tensors of shape ``(B,)``
so one call serves a batch whose rows asked for different settings. Randomness comes only from
explicit ``torch.Generator`` objects, one per row, so a seeded row draws the same numbers whether
it is sampled alone or inside any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set logits of padded vocabulary rows (ids >= vocab_size) to -inf so they are never drawn."""
    if logits.size(-1) <= vocab_size:
        return logits
    logits = logits.clone()
    logits[..., vocab_size:] = float("-inf")
    return logits


def logits_to_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probabilities (B, V) after temperature, top-k, top-p (nucleus) and min-p filtering.

    ``temperature`` must be > 0 for every row (greedy rows are handled by ``sample``).
    ``top_k`` 0, ``top_p`` 1.0 and ``min_p`` 0.0 switch a filter off for that row, and a row whose
    filter is off is never touched by it (bit for bit): top-p 1.0 applied anyway could drop tail
    tokens once the rounded cumulative sum reaches 1.0, and only when another row asked for top-p,
    which would break batch invariance.
    """
    logits = logits.float() / temperature.float().unsqueeze(1)
    if top_k is not None and bool((top_k > 0).any()):
        V = logits.size(-1)
        on = (top_k > 0).unsqueeze(1)
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).long().unsqueeze(1))
        logits = logits.masked_fill(on & (logits < kth), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and bool((top_p < 1.0).any()):
        on = (top_p < 1.0).unsqueeze(1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # mass strictly before each token; a token is kept while that mass is below top_p,
        # so the most likely token always survives.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = on & (before >= top_p.float().unsqueeze(1))
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if min_p is not None and bool((min_p > 0).any()):
        on = (min_p > 0).unsqueeze(1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.float().unsqueeze(1)
        probs = probs.masked_fill(on & (probs < threshold), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def draw_uniforms(generators: Sequence[torch.Generator | None], device=None) -> torch.Tensor:
    """One uniform number in [0, 1) per row, each from that row's own generator (CPU)."""
    out = torch.empty(len(generators), dtype=torch.float64)
    for i, gen in enumerate(generators):
        out[i] = torch.rand((), generator=gen, dtype=torch.float64)
    return out.to(device) if device is not None else out


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row b picks the first token whose cumulative mass exceeds u_b."""
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(cdf.device).double() * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # Guard the edge u*total == total (rounding): fall back to the last token with mass.
    last_nonzero = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.minimum(idx, last_nonzero)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row: argmax where temperature == 0, else a draw from the filtered probs."""
    greedy = temperature <= 0
    tokens = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return tokens
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = logits_to_probs(logits, safe_t, top_k, top_p, min_p)
    drawn = sample_from_probs(probs, draw_uniforms(generators, device=logits.device))
    return torch.where(greedy.to(tokens.device), tokens, drawn)


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a fresh random seed when None)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
