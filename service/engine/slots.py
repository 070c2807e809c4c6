"""KV slots and the prefix reuse they allow. Plain Python (no torch).

A slot is *free* (holds nothing), *busy* (a running sequence's window) or *cached* (a finished
sequence's window, kept until the slot is wanted). Slot ``s`` of a sequence ``seq`` holds the keys
and values of ``seq.window(0, seq.num_computed)`` at positions ``0..num_computed-1``: a causal
model's key at position i depends only on tokens ``0..i``, so any window that starts with the same
tokens can start from those rows (``longest_prefix``) and prefill only the rest. A sliding-window
crop sets ``num_computed`` to 0 and re-encodes the slot from position 0, so a cropped sequence
offers nothing until its new window is computed again, and then offers that window.

Why slot-level reuse and not blocks (nano-vllm hashes 256-token blocks, SGLang keeps a radix tree
of token runs over paged KV): a slot holds one window and a decode step attends over a plain view
of slots ``0..width-1`` (``model.kv_cache``); blocks would need a paged attention kernel and a
gather on every decode step. Reuse here is a copy of the matched rows into the new sequence's slot
(a few milliseconds for a 512-token GPT-2 prefix, against about a second to prefill it on CPU), or
none at all when the new sequence takes over the finished sequence's slot itself.

Allocation keeps the busy slots packed low: the decode batch reads every slot below the highest
busy one, so a hole costs every decode step. A new sequence takes a free slot below the highest
busy slot, else the least recently used cached one below it, else the slot just above it (evicting
whatever is cached there). With every slot in use (a loaded server) that is plain LRU eviction;
at low load the cache keeps fewer entries rather than widen the decode batch. A cached slot counts
as free for admission: cached entries never delay a request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.engine.sequence import Sequence


@dataclass(frozen=True)
class PrefixHit:
    """The longest reusable prefix found for a window: positions ``0..length-1`` of ``slot``;
    ``cached``: the slot holds a finished sequence (it may be taken over without a copy)."""

    slot: int
    length: int
    cached: bool


@dataclass(frozen=True)
class SlotCopy:
    """Copy positions ``0..length-1`` of every layer from slot ``source`` into slot ``target``
    before the step's forward (in admission order: a later copy may read an earlier one's rows)."""

    source: int
    target: int
    length: int


class SlotAllocator:
    """Which KV slots are free, busy, or cached (least recently used first), and which slot a new
    sequence gets."""

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self._free = set(range(n_slots))
        self._busy: set[int] = set()
        self._cached: OrderedDict[int, Sequence] = OrderedDict()

    @property
    def width(self) -> int:
        """One past the highest busy slot: the decode batch reads slots ``0..width-1``."""
        return max(self._busy) + 1 if self._busy else 0

    def allocate(self) -> int:
        """A slot for a new sequence (see the module docstring); evicts a cached entry if it
        must. Raises ``RuntimeError`` when every slot is busy."""
        if not self._free and not self._cached:
            raise RuntimeError("no free slot")
        width = self.width
        below = [s for s in self._free if s < width]
        if below:
            slot = min(below)
        else:
            slot = next((s for s in self._cached if s < width), width)
            self._cached.pop(slot, None)
        self._free.discard(slot)
        self._busy.add(slot)
        return slot

    def take(self, slot: int) -> None:
        """Give the cached slot ``slot`` to a new sequence that continues its prefix."""
        del self._cached[slot]
        self._busy.add(slot)

    def free(self, slot: int, keep: Sequence | None = None) -> None:
        """Release a busy slot: cached with ``keep`` (the finished sequence whose rows it
        holds), else free."""
        if slot not in self._busy:
            raise ValueError(f"slot {slot} is not allocated")
        self._busy.remove(slot)
        if keep is not None and keep.num_computed:
            self._cached[slot] = keep
        else:
            self._free.add(slot)

    def touch(self, slot: int) -> None:
        """Mark a cached slot used now (it is evicted last)."""
        self._cached.move_to_end(slot)

    def recent(self) -> Iterator[tuple[int, Sequence]]:
        """(slot, finished sequence) of every cached slot, most recently used first."""
        return reversed(self._cached.items())

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_free(self) -> int:
        """Slots a new sequence may take now: free or cached."""
        return len(self._free) + len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of the slots running sequences hold (cached ones are reclaimable)."""
        return len(self._busy) / self.n_slots


def longest_prefix(window: list[int], running: list[Sequence], allocator: SlotAllocator
                   ) -> PrefixHit | None:
    """The longest prefix of ``window`` whose keys and values a running or cached sequence's slot
    holds, at most ``len(window) - 1`` tokens (the last one is computed for its logits); a cached
    slot wins a tie (taking it over saves the copy). None when nothing matches."""
    limit = len(window) - 1
    best: PrefixHit | None = None
    # cached slots first, most recently used first (of the longest, the most recent wins), then
    # running ones, which must be strictly longer; a match of ``limit`` tokens cannot be beaten,
    # so each scan stops there (n sequences of one prompt: O(1), not O(n), per admission)
    for slot, seq in allocator.recent():
        n = common_prefix(window, seq.tokens, seq.window_start, min(limit, seq.num_computed))
        if n and (best is None or n > best.length):
            best = PrefixHit(slot, n, True)
            if n == limit:
                return best
    for seq in running:
        if not seq.num_computed:  # admitted this step: holds nothing yet
            continue
        n = common_prefix(window, seq.tokens, seq.window_start, min(limit, seq.num_computed))
        if n and (best is None or n > best.length):
            best = PrefixHit(seq.slot, n, False)
            if n == limit:
                break
    return best


def common_prefix(a: list[int], b: list[int], b_start: int, limit: int) -> int:
    """How many leading tokens of ``a`` equal ``b[b_start:]``, at most ``limit``: a binary search
    over slice comparisons (C loops, not a Python loop per token)."""
    if limit <= 0 or a[0] != b[b_start]:
        return 0
    if a[:limit] == b[b_start : b_start + limit]:
        return limit
    lo, hi = 1, limit  # a[:lo] matches, a[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[b_start : b_start + mid]:
            lo = mid
        else:
            hi = mid
    return lo
