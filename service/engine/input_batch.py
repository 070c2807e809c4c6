"""The persistent decode batch: a decode step's inputs kept across steps, not rebuilt per step.

A decode-only step whose rows are slots ``0..W-1`` (the usual step: the allocator keeps busy slots
packed low) needs, per slot, the token to compute, its position, its cache row and how many keys
it reads. ``KVCache.pack`` builds those from Python lists every step (columns, a host tensor, a
copy, a split into six tensors). Here they live in one ``(4, n_slots)`` int64 buffer for the
engine's lifetime, written through a NumPy view of its memory (a NumPy write costs ~0.2 us, a
torch one ~3 us). The batch the model reads holds only views (of these buffers, of the cache's
slots and of the mask below), so one is made per shape (width, keys read, masked) and a later step
of that shape reuses it: a one-row batch costs ~2 us here against ~26 us packed
(``bench/step_ops.py``). On CUDA the host buffer is pinned and copied into a twin buffer on the
device with one asynchronous copy per step; on CPU the model reads the host buffer itself. Rows
at different positions need an attention mask; it is kept across steps as well (a decode step
turns on one key per row, in one fill) instead of being built from the lengths every step: 39 us
against 56-130 us for 32 such rows here.

vLLM v1 keeps its ``InputBatch`` the same way (``*_cpu`` tensors, pinned, sharing memory with
``*_np`` arrays, copied into persistent device tensors); nano-vllm's ``prepare_decode`` rebuilds
its inputs from lists each step, as ``KVCache.pack`` does here for every other kind of step.
"""

from __future__ import annotations

import numpy as np
import torch

from model.kv_cache import DecodeGroup, KVCache, PackedBatch


class DecodeInputs:
    """Owns the persistent inputs of decode steps over ``kv``: rows tokens, positions, cache rows
    and context lengths, one column per slot, on the host (a NumPy view writes them) and, on
    CUDA, their device copy."""

    MAX_BATCHES = 4096  # batch shapes kept (a few KB each: tensor views, no data)

    def __init__(self, kv: KVCache) -> None:
        self.kv = kv
        n, device = kv.n_slots, kv.data.device
        self._cuda = device.type == "cuda"
        # rows: tokens, positions, cache rows and slots of the step's rows (row i is slot
        # ``slots[i]``), then context lengths per slot
        self._host = torch.zeros((5, n), dtype=torch.long, pin_memory=self._cuda)
        self.host = self._host.numpy()  # (5, n_slots), the same memory as ``_host``
        self._dev = torch.zeros((5, n), dtype=torch.long, device=device) if self._cuda else (
            self._host)
        self._row0 = np.arange(n, dtype=np.int64) * kv.max_len  # slot s's first cache row
        self._views: dict[int, tuple] = {}  # width -> its rows' NumPy and tensor views
        # (width, keys read, masked) -> the batch of that shape: views only, made once
        self._batches: dict[tuple[int, int, bool], PackedBatch] = {}
        # the attention mask of rows at different positions, kept across steps too: row s is
        # 0 for the ``_visible[s]`` keys slot s's last masked step read and -inf after them; a
        # step turns on the keys its rows gained (one per decode row) and turns off the keys of
        # a row whose slot changed hands or cropped, instead of building the mask anew
        self._mask = torch.full((n, 1, 1, kv.max_len), float("-inf"), dtype=kv.data.dtype,
                                device=device)
        self._visible = np.zeros(n, dtype=np.int64)
        self._flat = self._mask.view(-1)

    def batch(self, tokens: list[int], positions: list[int],
              slots: list[int] | None = None) -> PackedBatch:
        """The packed batch of a decode step: ``tokens[i]`` at window position ``positions[i]``
        in slot ``slots[i]`` (increasing; None: row i is slot i). The same batch as
        ``kv.pack(list(zip(slots, positions, tokens)))`` builds. Slots below the last one that
        have no row (holes: sequences that finished) cost no row of the matmuls: attention runs
        over slots ``0..W-1`` and scatters the rows' queries by slot, as ``pack`` does."""
        rows = len(tokens)
        first, last = min(positions), max(positions)
        if first < 0 or last >= self.kv.max_len:
            bad = first if first < 0 else last
            raise ValueError(f"position {bad} is past the KV cache's {self.kv.max_len}")
        width = rows if slots is None or slots[-1] == rows - 1 else slots[-1] + 1
        views = self._views.get(width) or self._make_views(width)
        tok, pos, write, slot_of, lens, row0 = views[:6]
        if width == rows:  # row i is slot i (the allocator keeps busy slots packed low)
            tok[:] = tokens
            pos[:] = positions
            np.add(row0, pos, out=write)  # slot * max_len + position
            masked = first != last  # rows at different positions: each reads its own keys
            if masked:
                np.add(pos, 1, out=lens)  # keys 0..position
        else:  # holes: row i is slot slots[i]; a hole reads key 0 only (its output unused)
            tok, pos, write, slot_of = tok[:rows], pos[:rows], write[:rows], slot_of[:rows]
            tok[:] = tokens
            pos[:] = positions
            slot_of[:] = slots
            np.add(row0[slot_of], pos, out=write)
            lens.fill(1)
            lens[slot_of] = pos + 1
            masked = True
        if self._cuda:
            # one asynchronous copy from pinned memory; the host buffer is next written after
            # this step's sampled tokens were read back, so the copy has finished by then
            self._dev.copy_(self._host, non_blocking=True)
        if masked:
            self._update_mask(lens)
        key = (width, last + 1, masked, rows)
        return self._batches.get(key) or self._make_batch(key, views[6:])

    def _make_batch(self, key: tuple[int, int, bool, int], views: tuple) -> PackedBatch:
        """The batch of ``rows`` rows over slots ``0..width-1`` reading ``length`` keys (through
        the mask when ``masked``): views of the persistent buffers, the mask and the cache only,
        so a later step of the same shape reuses it as it is (the buffers' contents are the
        step's). Up to ``MAX_BATCHES`` are kept (then all are dropped and made again as steps
        need them)."""
        width, length, masked, rows = key
        if len(self._batches) >= self.MAX_BATCHES:
            self._batches.clear()
        t, p, w, s, rows_mask, lens = views
        if rows < width:
            t, p, w, s = t[:rows], p[:rows], w[:rows], s[:rows]
        mask = rows_mask.narrow(3, 0, length) if masked else None  # (width, 1, 1, length)
        keys, values = self.kv.slots_view(width, length)
        batch = self._batches[key] = PackedBatch(
            t, p, w, None, DecodeGroup(width, length, mask, keys, values,
                                       None if rows == width else s,
                                       lens if masked else None), ())
        return batch

    def _update_mask(self, lens: np.ndarray) -> None:
        """Make mask rows ``0..len(lens)-1`` show keys ``0..lens[s]-1`` (and no others): the keys
        between what a row shows and what it must show change, in one fill per value."""
        width = len(lens)
        shown = self._visible[:width]
        if ((lens - shown) == 1).all():  # the usual step: each row gained one key
            self._fill(self._row0[:width] + shown, 0.0)  # row s's cells start at s * max_len
            shown[:] = lens
            return
        for value, start, end in ((0.0, shown, lens), (float("-inf"), lens, shown)):
            counts = np.maximum(end - start, 0)
            total = int(counts.sum())
            if not total:
                continue
            rows = np.repeat(np.arange(len(lens)), counts)
            # row r's cells are start[r] .. end[r]-1: a global count, less where the row's block
            # begins in it, plus its start
            begin = np.cumsum(counts) - counts
            cells = rows * self.kv.max_len + np.repeat(start - begin, counts) + np.arange(total)
            self._fill(cells, value)
        shown[:] = lens

    def _fill(self, cells: np.ndarray, value: float) -> None:
        """Set the mask's flat cells ``cells`` (slot * max_len + key) to ``value``."""
        index = torch.from_numpy(cells)
        if self._cuda:  # staged in pinned memory: an asynchronous copy
            index = index.pin_memory()
        self._flat.index_fill_(0, index.to(self._flat.device, non_blocking=True), value)

    def _make_views(self, width: int) -> tuple:
        """The first ``width`` columns of each row, as NumPy views (written) and tensor views
        (read by the model), the slots' first cache rows and the mask's rows: made once per
        width."""
        host, dev = self.host, self._dev
        views = self._views[width] = (*host[:4, :width], host[4, :width], self._row0[:width],
                                      *dev[:4, :width], self._mask[:width], dev[4, :width])
        return views
