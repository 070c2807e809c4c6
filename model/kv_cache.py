"""A preallocated key/value cache addressed by (slot, position).

The cache owns two tensors of shape ``(n_layer, n_slots, n_head, max_len, head_dim)``. A batch row
is bound to a slot by the caller, and every token carries its absolute position, so rows of one
batch can hold sequences of different lengths (the engine's continuous batching relies on this).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for ``n_slots`` sequences of up to ``max_len`` tokens each.

    ``update(layer, slots, positions, k, v)`` writes the new keys/values of one layer and returns
    the keys, values and attention mask the batch must attend over. A position below zero marks a
    padding token: it is not written, and its output is meaningless.
    """

    def __init__(
        self,
        n_layer: int,
        n_slots: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, n_slots, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.n_slots = n_slots

    @classmethod
    def for_model(
        cls, config, n_slots: int, *, max_len: int | None = None, device=None, dtype=None
    ) -> KVCache:
        """A cache shaped for ``config`` (a GPTConfig), ``max_len`` defaulting to block_size."""
        return cls(
            config.n_layer,
            n_slots,
            config.n_head,
            max_len or config.block_size,
            config.head_dim,
            device=device or "cpu",
            dtype=dtype or torch.float32,
        )

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def attention_mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Boolean mask (B, 1, T, length): a query at position p sees cached keys at 0..p."""
        query_pos = positions.clamp(min=0)  # padding rows attend to key 0 only (ignored later)
        key_pos = torch.arange(length, device=positions.device)
        return key_pos.view(1, 1, 1, length) <= query_pos.view(*query_pos.shape[:2], 1).unsqueeze(1)

    def update(
        self,
        layer: int,
        slots: torch.Tensor | None,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (B, nh, T, hs) at (slots, positions); return (B, nh, length, hs).

        ``slots`` None means row b is slot b (then the result is a view, not a gather).
        ``length`` is one past the largest position in the batch: keys beyond it are never read.
        """
        B, T = positions.shape
        valid = positions >= 0  # (B, T)
        if slots is None:
            slots_or_rows = torch.arange(B, device=positions.device)
        else:
            slots_or_rows = slots
        rows = slots_or_rows.view(B, 1).expand(B, T)[valid]  # (N,)
        pos = positions[valid]  # (N,)
        # Advanced indices split by a slice put the indexed dim first: target is (N, nh, hs).
        self.k[layer][rows, :, pos] = k.transpose(1, 2)[valid].to(self.k.dtype)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)[valid].to(self.v.dtype)
        if slots is None:
            return self.k[layer, :B, :, :length], self.v[layer, :B, :, :length]
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]

    def clear_slot(self, slot: int) -> None:
        """Zero one slot (not needed for correctness: positions are always written before read)."""
        self.k[:, slot].zero_()
        self.v[:, slot].zero_()
