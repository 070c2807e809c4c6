"""Sampling as pure functions of (logits, per-row parameters, per-row seeds and counters).

Every function takes a batch of logits ``(B, V)`` and per-row parameter tensors of shape ``(B,)``
so one call serves a batch whose rows asked for different settings. Randomness is counter-based:
row b's uniform for its t-th draw is a hash of ``(seed_b, t)`` computed on the logits' device
(``counter_uniforms``), so a seeded row draws the same numbers alone or inside any batch, on any
device, with no generator state to carry and nothing to synchronise with the host.

Whether a filter runs at all is decided by the caller from host-side knowledge (``None`` = no row
asked for it), never by inspecting device tensors, so no function here waits on the device.

The engine's sampler (``service.engine.sampler``) composes them. The reference generator does
not: it samples with ``model.reference_sampling``, written from the definitions, so the engine is
tested against code it does not share.
"""

from __future__ import annotations

import hashlib
import secrets

import torch

_MASK32 = 0xFFFFFFFF


def random_seed() -> int:
    """A fresh seed for a request that did not give one (63 bits, like ``SamplingParams.seed``)."""
    return secrets.randbits(63)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request seeded with ``seed`` (63 bits).

    Choice 0 keeps ``seed`` (so ``n=1`` and choice 0 of ``n>1`` agree); choice j > 0 draws with
    a hash of (seed, j), so nearby seeds share no choices (``seed + j`` made (1, n=3) and
    (2, n=3) return two of the same texts). BLAKE2b, not a PRNG's seeding: it is stable across
    versions and platforms, and a client can recompute it (docs/API.md)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Mueller's ``hash32``) on int64 tensors holding values < 2**32.

    The multiplier is below 2**27, so products stay below 2**59: no int64 overflow anywhere."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform float64 in [0, 1) per row: a hash of (``seeds[b]``, ``counters[b]``).

    ``seeds`` are in [0, 2**63), ``counters`` in [0, 2**32) (int64). Two 32-bit hashes give the
    53 bits of a float64 mantissa.
    """
    seeds, counters = seeds.long(), counters.long()
    x = _mix32((seeds >> 32) & _MASK32)
    x = _mix32(x ^ (seeds & _MASK32))
    x = _mix32(x ^ (counters & _MASK32))
    high = _mix32(x ^ 0x68E31DA4) >> 5  # 27 bits
    low = _mix32(x ^ 0x35297A4D) >> 6  # 26 bits
    return ((high << 26) | low).double() * (1.0 / 2**53)


def logits_to_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    *,
    top_k_max: int | None = None,
) -> torch.Tensor:
    """Probabilities (B, V) after temperature, top-k, top-p (nucleus) and min-p filtering.

    ``temperature`` must be > 0 for every row. A filter given as None is off for every row; given
    as a tensor, ``top_k`` 0, ``top_p`` 1.0 and ``min_p`` 0.0 switch it off for that row, and a row
    whose filter is off is never touched by it (bit for bit), so its result does not depend on
    its batch. ``top_k_max`` (host-side: the largest ``top_k`` of the batch) lets top-k select
    that many candidates instead of sorting the whole vocabulary.
    """
    logits = logits.float() / temperature.float().unsqueeze(1)
    V = logits.size(-1)
    if top_k is not None:
        k_max = min(top_k_max or V, V)
        on = (top_k > 0).unsqueeze(1)
        k = torch.where(top_k > 0, top_k.clamp(max=k_max), torch.full_like(top_k, k_max))
        kth = logits.topk(k_max, dim=-1).values.gather(1, (k - 1).long().unsqueeze(1))
        logits = logits.masked_fill(on & (logits < kth), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None:
        on = (top_p < 1.0).unsqueeze(1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # mass strictly before each token; a token is kept while that mass is below top_p,
        # so the most likely token always survives.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = on & (before >= top_p.float().unsqueeze(1))
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if min_p is not None:
        on = (min_p > 0).unsqueeze(1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.float().unsqueeze(1)
        probs = probs.masked_fill(on & (probs < threshold), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row b picks the first token whose cumulative mass exceeds u_b."""
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(cdf.device).double() * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # Guard the edge u*total == total (rounding): fall back to the last token with mass.
    last_nonzero = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.minimum(idx, last_nonzero)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set logits of padded vocabulary rows (ids >= vocab_size) to -inf so they are never drawn."""
    if logits.size(-1) <= vocab_size:
        return logits
    logits = logits.clone()
    logits[..., vocab_size:] = float("-inf")
    return logits

