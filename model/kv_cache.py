"""A preallocated key/value cache addressed by (slot, position).

The cache owns two tensors of shape ``(n_layer, n_slots, n_head, max_len, head_dim)``. A batch row
is bound to a slot by the caller, and every token carries its absolute position, so rows of one
batch can hold sequences of different lengths (the engine's continuous batching relies on this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheBatch:
    """What every layer of one cached forward needs, worked out once per forward.

    ``length`` is how many key positions attention reads; ``mask`` (B, 1, T, length) lets a query
    at position p see its slot's keys at 0..p; ``write_rows``/``write_pos`` address the non-padding
    tokens (``valid``) whose keys and values the forward writes.
    """

    slots: torch.Tensor | None
    length: int
    mask: torch.Tensor
    valid: torch.Tensor
    write_rows: torch.Tensor
    write_pos: torch.Tensor


class KVCache:
    """Keys and values for ``n_slots`` sequences of up to ``max_len`` tokens each.

    ``prepare(positions, slots)`` binds a batch to the cache; ``update(layer, batch, k, v)`` then
    writes one layer's new keys/values and returns what the batch attends over. A position below
    zero marks a padding token: it is not written, and its output is meaningless.

    With ``fixed_length`` every forward attends over all ``max_len`` positions (masked to each
    query's own position) instead of "one past the batch's largest position": a row's arithmetic
    then never depends on which other sequences share its batch (the engine's batch invariance),
    and shapes are static. Masked keys contribute exactly zero either way.
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
        fixed_length: bool = False,
    ) -> None:
        shape = (n_layer, n_slots, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.n_slots = n_slots
        self.fixed_length = fixed_length

    @classmethod
    def for_model(
        cls,
        config,
        n_slots: int,
        *,
        max_len: int | None = None,
        device=None,
        dtype=None,
        fixed_length: bool = False,
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
            fixed_length=fixed_length,
        )

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def prepare(self, positions: torch.Tensor, slots: torch.Tensor | None) -> CacheBatch:
        """Bind a batch: ``positions`` (B, T), row b in slot ``slots[b]`` (None: slot b)."""
        B, T = positions.shape
        if self.fixed_length:
            length = self.max_len
            if bool((positions >= self.max_len).any()):
                raise ValueError(f"a position is past the KV cache's {self.max_len}")
        else:
            length = int(positions.max()) + 1  # keys past the batch's last position are unread
            if length > self.max_len:
                raise ValueError(f"position {length - 1} is past the KV cache's {self.max_len}")
        query_pos = positions.clamp(min=0)  # padding attends to key 0 only (ignored later)
        key_pos = torch.arange(length, device=positions.device)
        mask = key_pos.view(1, 1, 1, length) <= query_pos.view(B, 1, T, 1)
        valid = positions >= 0
        rows = torch.arange(B, device=positions.device) if slots is None else slots
        return CacheBatch(
            slots=slots,
            length=length,
            mask=mask,
            valid=valid,
            write_rows=rows.view(B, 1).expand(B, T)[valid],
            write_pos=positions[valid],
        )

    def update(
        self, layer: int, batch: CacheBatch, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (B, nh, T, hs) for the batch's valid tokens; return (B, nh, L, hs).

        With ``slots`` None the result is a view of the cache, otherwise a gather.
        """
        rows, pos, valid = batch.write_rows, batch.write_pos, batch.valid
        # Advanced indices split by a slice put the indexed dim first: target is (N, nh, hs).
        self.k[layer][rows, :, pos] = k.transpose(1, 2)[valid].to(self.k.dtype)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)[valid].to(self.v.dtype)
        if batch.slots is None:
            B = k.shape[0]
            return self.k[layer, :B, :, : batch.length], self.v[layer, :B, :, : batch.length]
        slots = batch.slots
        return self.k[layer, slots, :, : batch.length], self.v[layer, slots, :, : batch.length]

    def copy_slot(self, source: int, target: int, start: int, end: int) -> None:
        """Copy positions ``start:end`` of every layer from one slot to another (shared prompts)."""
        self.k[:, target, :, start:end] = self.k[:, source, :, start:end]
        self.v[:, target, :, start:end] = self.v[:, source, :, start:end]
