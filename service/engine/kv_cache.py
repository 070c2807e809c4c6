"""KV cache sizing: how many slots of the model package's ``KVCache`` a memory budget buys.

The cache is slot-based: one preallocated slot of ``block_size`` positions per concurrent
sequence. Why slots, not blocks: a sequence never holds more than one window (``block_size``,
128 for the shipped shakespeare-char, 1024 for GPT-2) and is re-encoded when it outgrows it, so paging would
save memory only for sequences shorter than a window, at the price of a gather of every block on
every decode step; with slots, a decode step attends over a plain view of the cache.
"""

from __future__ import annotations

import torch

from model.config import GPTConfig


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
