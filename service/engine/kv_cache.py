"""KV cache sizing and the engine's fixed-window view of the model package's ``KVCache``.

The cache is slot-based: one preallocated slot of ``block_size`` positions per concurrent
sequence. Why slots, not blocks: a sequence never holds more than one window (``block_size``,
256 for shakespeare-char, 1024 for GPT-2) and is re-encoded when it outgrows it, so paging would
save memory only for sequences shorter than a window, at the price of a gather of every block on
every decode step; with slots, a decode step attends over a plain view of the cache.
"""

from __future__ import annotations

import torch

from model.config import GPTConfig
from model.kv_cache import KVCache


def bytes_per_slot(config: GPTConfig, dtype: torch.dtype) -> int:
    """Bytes one slot holds: keys and values of every layer for ``block_size`` positions."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * config.block_size * config.n_embd * element


def plan_slots(
    config: GPTConfig, dtype: torch.dtype, max_batch_size: int, kv_memory: int | None
) -> int:
    """How many slots to preallocate: ``max_batch_size``, fewer if ``kv_memory`` is smaller."""
    if kv_memory is None:
        return max_batch_size
    n = kv_memory // bytes_per_slot(config, dtype)
    if n < 1:
        raise ValueError(
            f"kv_memory={kv_memory} bytes cannot hold one sequence window "
            f"({bytes_per_slot(config, dtype)} bytes for this model in {dtype})"
        )
    return min(max_batch_size, n)


class WindowKVCache(KVCache):
    """A ``KVCache`` whose every forward attends over the whole window (``max_len`` keys).

    With ``fixed_length`` the attention kernels always see the same key length, masked to each
    query's position, instead of "one past the batch's largest position": a row's arithmetic
    then never depends on which other sequences share its batch (batch invariance). The masked
    keys contribute exactly zero, so results equal the variable-length cache's up to rounding.
    """

    def __init__(self, config: GPTConfig, n_slots: int, *, device, dtype, fixed_length: bool):
        super().__init__(
            config.n_layer, n_slots, config.n_head, config.block_size, config.head_dim,
            device=device, dtype=dtype,
        )
        self.fixed_length = fixed_length
        self._indexed_positions: torch.Tensor | None = None
        self._index: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def attention_mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        return super().attention_mask(positions, self.max_len if self.fixed_length else length)

    def update(self, layer, slots, positions, k, v, length):
        """``KVCache.update``, with the write indices worked out once per forward, not per
        layer (every layer of a forward passes the same ``positions`` tensor)."""
        length = self.max_len if self.fixed_length else length
        if positions is not self._indexed_positions:
            B, T = positions.shape
            valid = positions >= 0  # (B, T); padding tokens are not written
            rows = torch.arange(B, device=positions.device) if slots is None else slots
            self._index = (valid, rows.view(B, 1).expand(B, T)[valid], positions[valid])
            self._indexed_positions = positions
        valid, rows, pos = self._index
        self.k[layer][rows, :, pos] = k.transpose(1, 2)[valid].to(self.k.dtype)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)[valid].to(self.v.dtype)
        if slots is None:
            B = positions.shape[0]
            return self.k[layer, :B, :, :length], self.v[layer, :B, :, :length]
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]
