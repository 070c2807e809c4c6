"""Attention over the KV cache for a packed batch (``model.kv_cache.PackedBatch``): the decode
group's one query per row in one call (PyTorch's SDPA, or the project's CPU kernel,
``model.cpu_gemv.CpuGemv.attend_rows``), then each prefill chunk over its own slot."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.cpu_gemv import CpuGemv
from model.kv_cache import KVCache, PackedBatch


def packed_attention(q: torch.Tensor, layer: int, kv: KVCache, batch: PackedBatch,
                     kernel: CpuGemv | None = None) -> torch.Tensor:
    """Attention of packed queries ``q`` (N, C) over the cache: the decode group in one batched
    call over a view of slots ``0..width-1`` (with ``kernel``, the project's CPU kernel reading
    each row's own slot and keys: ``CpuGemv.attend_rows``, given only once the step's rows were
    found readable, ``decode_kernel``), then each chunk over its own slot."""
    N, C = q.shape
    nh, hs = kv.n_head, kv.head_dim
    dec = batch.decode
    if kernel is not None and kernel.row_queries(q, kv, layer):
        n_dec = dec.rows
        y = kernel.attend_checked(q[:n_dec], kv, layer, dec.slots, dec.lengths, dec.length)
        if not batch.chunks and N == n_dec:
            return y
        out = torch.empty_like(q)
        out[:n_dec] = y
        return _chunk_attention(q, layer, kv, batch, out)
    if dec is not None and dec.slots is None and not batch.chunks and N == dec.width:
        # decode only, row i is slot i: no scatter, no gather (the common step)
        y = F.scaled_dot_product_attention(
            q.view(N, nh, 1, hs), dec.keys[layer], dec.values[layer], dec.mask
        )  # (W, nh, 1, hs): one query per slot, so (N, nh, 1, hs) is just (N, C) regrouped
        return y.view(N, C)
    out = torch.empty_like(q)
    if dec is not None:
        W = dec.width
        n_dec = dec.rows
        qd = q[:W] if dec.slots is None else q.new_zeros(W, C).index_copy_(0, dec.slots, q[:n_dec])
        y = F.scaled_dot_product_attention(
            qd.view(W, nh, 1, hs), dec.keys[layer], dec.values[layer], dec.mask
        ).view(W, C)
        out[:n_dec] = y if dec.slots is None else y.index_select(0, dec.slots)
    return _chunk_attention(q, layer, kv, batch, out)


def decode_kernel(kernel: CpuGemv | None, kv: KVCache, batch: PackedBatch) -> CpuGemv | None:
    """``kernel`` if it can read the attention of ``batch``'s decode rows (checked once a step:
    every layer reads the same slots and key counts), else None."""
    dec = batch.decode
    if kernel is None or dec is None:
        return None
    return kernel if kernel.rows_readable(kv, dec.rows, dec.slots, dec.lengths, dec.length) else None


def _chunk_attention(q: torch.Tensor, layer: int, kv: KVCache, batch: PackedBatch,
                     out: torch.Tensor) -> torch.Tensor:
    """Each chunk of ``batch`` over its own slot, into ``out``'s rows (returned)."""
    C, nh, hs = q.shape[1], kv.n_head, kv.head_dim
    for c in batch.chunks:
        T = c.num_tokens
        qc = q[c.row : c.row + T].view(1, T, nh, hs).transpose(1, 2)  # (1, nh, T, hs)
        k, v = kv.slot_view(layer, c.slot, c.start + T)  # (1, nh, start + T, hs)
        y = F.scaled_dot_product_attention(qc, k, v, attn_mask=c.mask, is_causal=c.mask is None)
        out[c.row : c.row + T] = y.transpose(1, 2).reshape(T, C)
    return out
