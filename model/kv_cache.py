"""A preallocated key/value cache addressed by (slot, position), and the packed batch that uses it.

One forward runs a *packed* batch: the N tokens of every sequence scheduled this step, flattened
into one ``(N, C)`` activation (vLLM v1's layout). Each token carries its slot and its absolute
position; its key and value are written into the cache by index, and attention reads each
sequence's own cached keys up to its own position. Padding tokens write into a scratch slot.

Layout, per layer: ``(n_slots + 1, max_len, 2, n_embd)``: keys and values of one token sit side by
side, so one ``index_copy_`` writes both from the fused qkv projection, and a slot's keys are a
strided ``(n_head, length, head_dim)`` view that scaled-dot-product attention reads in place.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import NamedTuple

import torch

from model.huge_pages import huge_page_zeros

# DecodeGroup, Chunk and PackedBatch are named tuples, not frozen dataclasses: one of each is
# built every step, and a frozen dataclass's __init__ costs ~2 us here (a named tuple's ~0.3 us)


class DecodeGroup(NamedTuple):
    """Tokens that decode (one query each), attended as one batch laid out in slot order.

    Decode tokens are the batch's first rows. Query ``i`` of the attention batch belongs to slot
    ``i``: the cache's slots ``0..width-1`` are read as a view, with no gather. ``slots`` (D,) is
    the slot of each of the D decode rows, which attention scatters its queries by (None: the
    first ``width`` rows are slots ``0..width-1`` in order, nothing to scatter). ``mask``
    (width, 1, 1, length) is additive: 0 for keys at or before the row's position, -inf after (a
    slot without a token here sees only key 0, and its output is never used); None when every
    row reads all ``length`` keys (one row alone, or rows at one position).
    """

    width: int
    length: int
    mask: torch.Tensor | None
    keys: torch.Tensor  # (n_layer, width, n_head, length, head_dim) view of the cache
    values: torch.Tensor
    slots: torch.Tensor | None = None
    # (width,): how many keys each slot reads (what ``mask`` shows); None without a mask
    lengths: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """The batch's decode rows: one per slot, or one per gathered slot (``slots``)."""
        return self.width if self.slots is None else self.slots.shape[0]


class Chunk(NamedTuple):
    """``num_tokens`` consecutive packed rows from ``row`` that extend slot ``slot`` from position
    ``start`` (a prompt chunk, or a window being re-encoded); ``mask`` (T, start + T) is the causal
    mask offset by ``start`` (None when ``start`` is 0: plain causal attention)."""

    row: int
    num_tokens: int
    slot: int
    start: int
    mask: torch.Tensor | None


class PackedBatch(NamedTuple):
    """Everything one packed forward needs, built once per step and shared by every layer.

    ``tokens``/``positions``/``write_index`` are (N,): the token ids, their absolute positions and
    the flat cache row (slot * max_len + position) their keys and values go to. ``logit_rows``
    (R,) are the rows whose next-token logits the step needs (None: all N, in order).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    write_index: torch.Tensor
    logit_rows: torch.Tensor | None
    decode: DecodeGroup | None
    chunks: tuple[Chunk, ...]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


class KVCache:
    """Keys and values for ``n_slots`` sequences of up to ``max_len`` positions each, plus one
    scratch slot (index ``n_slots``) that padding tokens write into."""

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
        self.n_layer, self.n_slots, self.n_head = n_layer, n_slots, n_head
        self.max_len, self.head_dim = max_len, head_dim
        self.n_embd = n_head * head_dim
        shape = (n_layer, n_slots + 1, max_len, 2, self.n_embd)
        if torch.device(device).type == "cpu":  # 2 MiB pages: fewer TLB misses (model.huge_pages)
            self.data = huge_page_zeros(shape, dtype)
        else:
            self.data = torch.zeros(shape, device=device, dtype=dtype)
        # per layer, one row per (slot, position): where index_copy_ writes
        self._rows = [self.data[i].view(-1, 2 * self.n_embd) for i in range(n_layer)]
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # width -> full-length

    @classmethod
    def for_model(cls, config, n_slots: int, *, device=None, dtype=None) -> KVCache:
        """A cache shaped for ``config`` (a GPTConfig): ``block_size`` positions per slot."""
        return cls(
            config.n_layer, n_slots, config.n_head, config.block_size, config.head_dim,
            device=device or "cpu", dtype=dtype or torch.float32,
        )

    @staticmethod
    def bytes_per_slot(config, dtype: torch.dtype) -> int:
        """Bytes one slot holds: keys and values of every layer for ``block_size`` positions."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * config.block_size * config.n_embd * element

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def scratch_slot(self) -> int:
        return self.n_slots

    def write(self, layer: int, batch: PackedBatch, kv: torch.Tensor) -> None:
        """Store the batch's keys and values ``kv`` (N, 2 * n_embd), token n at its cache row."""
        if kv.dtype is not self.data.dtype:
            kv = kv.to(self.data.dtype)
        self._rows[layer].index_copy_(0, batch.write_index, kv)

    def slots_view(self, width: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``0..width-1``, positions ``0..length-1``, for every layer:
        ``(n_layer, width, n_head, length, head_dim)`` views (no copy)."""
        full = self._views.get(width)
        if full is None:  # built once per width: a step then slices two views, not ten
            kv = self.data[:, :width]  # (n_layer, width, max_len, 2, C)
            shape = (self.n_layer, width, self.max_len, self.n_head, self.head_dim)
            full = self._views[width] = (kv[:, :, :, 0].view(shape).transpose(2, 3),
                                         kv[:, :, :, 1].view(shape).transpose(2, 3))
        return full[0].narrow(3, 0, length), full[1].narrow(3, 0, length)  # one op each

    def slot_view(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one slot, positions ``0..length-1``: ``(1, n_head, length, hd)``."""
        kv = self.data[layer, slot, :length]  # (length, 2, C)
        shape = (1, length, self.n_head, self.head_dim)
        return kv[:, 0].view(shape).transpose(1, 2), kv[:, 1].view(shape).transpose(1, 2)

    def copy_slot(self, source: int, target: int, start: int, end: int) -> None:
        """Copy positions ``start:end`` of every layer from one slot to another (shared prompts)."""
        self.data[:, target, start:end] = self.data[:, source, start:end]

    def pack(
        self,
        decode: Sequence[tuple[int, int, int]],
        chunks: Sequence[tuple[int, int, Sequence[int], bool]] = (),
        *,
        decode_width: int | None = None,
        decode_length: int | None = None,
    ) -> PackedBatch:
        """Bind one step's tokens to the cache.

        ``decode``: ``(slot, position, token)`` of each decoding sequence, in increasing slot
        order; each needs its logits. ``chunks``: ``(slot, start, tokens, wants_logits)`` of each
        chunk of consecutive positions; ``wants_logits`` asks for its last token's logits.
        ``decode_width`` pads the decode group to slots ``0..width-1`` (padding rows write into
        the scratch slot) and ``decode_length`` fixes how many key positions it reads: static
        shapes for batch invariance and captured graphs; the logits are then those of every row,
        padding included (row i is slot i). Otherwise logit rows come decode rows first, then
        chunks, in order. Everything goes to the device in one host-to-device copy.
        """
        L, scratch = self.max_len, self.scratch_slot
        dec_slots = [s for s, _, _ in decode]
        if dec_slots != sorted(set(dec_slots)):
            raise ValueError(f"decode slots must be distinct and increasing, got {dec_slots}")
        width = max(decode_width or 0, dec_slots[-1] + 1 if dec_slots else 0)
        identity = decode_width is not None or dec_slots == list(range(width))
        if identity and decode_width is not None:  # one row per slot 0..width-1
            by_slot = {s: (p, t) for s, p, t in decode}
            decode = [(s, *by_slot.get(s, (-1, 0))) for s in range(width)]
        tokens, positions, write, logit_rows = [], [], [], []
        lengths = [1] * width  # a slot with no token here reads key 0 only (output unused)
        if decode and decode_width is None:  # no padding rows: whole columns at once
            tokens = [token for _, _, token in decode]
            positions = [pos for _, pos, _ in decode]
            self._check_position(min(positions))
            self._check_position(max(positions))
            write = [slot * L + pos for slot, pos, _ in decode]
            for slot, pos, _ in decode:
                lengths[slot] = pos + 1
            logit_rows = list(range(len(decode)))
        for row, (slot, pos, token) in enumerate(decode if decode_width is not None else ()):
            if pos < 0:  # padding row: position 0, written into the scratch slot
                tokens.append(0)
                positions.append(0)
                write.append(scratch * L)
                continue
            self._check_position(pos)
            tokens.append(token)
            positions.append(pos)
            write.append(slot * L + pos)
            lengths[slot] = pos + 1
            logit_rows.append(row)
        length = max(decode_length or 0, max(lengths) if lengths else 0)
        spans = []
        for slot, start, chunk_tokens, wants_logits in chunks:
            T = len(chunk_tokens)
            self._check_position(start + T - 1)
            spans.append((len(tokens), T, slot, start))
            tokens.extend(chunk_tokens)
            positions.extend(range(start, start + T))
            write.extend(range(slot * L + start, slot * L + start + T))
            if wants_logits:
                logit_rows.append(len(tokens) - 1)
        n, n_dec = len(tokens), len(decode)
        dec_slot_list = [] if identity else dec_slots
        if logit_rows == list(range(n)) or (decode_width is not None and not chunks):
            # every row, in order: no gather (with a fixed decode width the LM head runs over
            # padding rows too, so its shape does not depend on how many slots are busy)
            logit_rows = None
        rows = logit_rows or []
        # on CUDA, staged in pinned memory (PyTorch's caching host allocator: a block is reused
        # only once the copy that read it is done), so the copy below is truly asynchronous
        # (an int64 array's buffer becomes a tensor without a per-element conversion)
        host = torch.frombuffer(
            array("q", [*tokens, *positions, *write, *rows, *dec_slot_list, *lengths]),
            dtype=torch.long,
        )
        if self.data.is_cuda:
            host = host.pin_memory()
        dev = host.to(self.data.device, non_blocking=True)
        t, p, w, r, d, lens = dev.split([n, n, n, len(rows), len(dec_slot_list), width])
        group = None
        if n_dec:
            mask = None
            if any(n != length for n in lengths):
                key_pos = torch.arange(length, device=dev.device)
                visible = (key_pos < lens.unsqueeze(1)).view(width, 1, 1, length)
                mask = torch.zeros(visible.shape, device=dev.device, dtype=self.data.dtype)
                mask.masked_fill_(~visible, float("-inf"))
            keys, values = self.slots_view(width, length)
            group = DecodeGroup(width=width, length=length, mask=mask, keys=keys, values=values,
                                slots=None if identity else d,
                                lengths=None if mask is None else lens)
        packed_chunks = []
        for row, T, slot, start in spans:
            mask = None
            if start > 0:  # query i (position start + i) sees keys 0..start + i
                q_pos = torch.arange(start, start + T, device=dev.device).unsqueeze(1)
                mask = torch.arange(start + T, device=dev.device).unsqueeze(0) <= q_pos
            packed_chunks.append(Chunk(row, T, slot, start, mask))
        return PackedBatch(t, p, w, None if logit_rows is None else r, group, tuple(packed_chunks))

    def _check_position(self, pos: int) -> None:
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} is past the KV cache's {self.max_len}")
