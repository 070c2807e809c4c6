"""Which slot a new window reuses: the longest prefix, a cached slot on a tie (the most recently
used of them), whatever order the candidates are scanned in."""

from __future__ import annotations

import itertools

from engine_support import request

from service.engine.scheduler import Scheduler
from service.engine.sequence import Sequence
from service.engine.slots import PrefixHit, SlotAllocator, longest_prefix

IDS = itertools.count()


def _seq(tokens: list[int], computed: int) -> Sequence:
    seq = Sequence(next(IDS), request(f"r{next(IDS)}", tokens, max_tokens=4), 0, 64, 16, 0)
    seq.num_computed = computed
    return seq


def _slots(running: list[tuple[list[int], int]], cached: list[tuple[list[int], int]]):
    """An allocator whose first slots run ``running`` and whose next hold ``cached`` (finished,
    least recently used first)."""
    allocator = SlotAllocator(len(running) + len(cached))
    seqs = []
    for tokens, computed in running + cached:
        seq = _seq(tokens, computed)
        seq.slot = allocator.allocate()
        seqs.append(seq)
    for seq in seqs[len(running):]:
        allocator.free(seq.slot, seq)
    return seqs[: len(running)], allocator


WINDOW = [1, 2, 3, 4, 5, 6]  # at most 5 tokens reusable: the last is computed for its logits
CASES = [
    # (running (tokens, computed), cached (tokens, computed), the hit)
    ([], [], None),
    ([([1, 2, 3, 9], 4)], [], PrefixHit(0, 3, False)),
    ([([1, 2, 3, 4, 5, 6, 7], 7)], [], PrefixHit(0, 5, False)),  # capped at len - 1
    ([([1, 2, 3, 4, 5, 6], 0)], [], None),  # admitted this step: holds nothing yet
    ([([1, 2, 3, 4], 2), ([1, 2, 3, 4], 4)], [], PrefixHit(1, 4, False)),  # computed rows only
    ([([1, 2, 9], 3), ([1, 2, 3, 4, 5], 5)], [], PrefixHit(1, 5, False)),
    ([([1, 2, 3, 4, 5], 5), ([1, 2, 3, 4, 5, 6], 6)], [], PrefixHit(0, 5, False)),  # first wins
    ([([1, 2, 3], 3)], [([1, 2, 3], 3)], PrefixHit(1, 3, True)),  # a tie: the cached slot
    ([([1, 2, 3, 4], 4)], [([1, 2, 3], 3)], PrefixHit(0, 4, False)),  # longer beats cached
    ([], [([1, 2, 3], 3), ([1, 2, 3], 3), ([1, 2], 2)], PrefixHit(1, 3, True)),  # most recent
    ([], [([1, 2, 3, 4, 5, 6], 6), ([1, 2, 3, 4, 5, 6], 6)], PrefixHit(1, 5, True)),
    ([([9, 2, 3], 3)], [([1, 9], 2)], PrefixHit(1, 1, True)),
]


def test_the_longest_prefix_wins_and_a_cached_slot_wins_a_tie():
    for i, (running, cached, want) in enumerate(CASES):
        seqs, allocator = _slots(running, cached)
        got = longest_prefix(WINDOW, seqs, allocator)
        assert got == want, f"case {i}: {running} / {cached}: {got}, want {want}"


def test_a_touched_cached_slot_becomes_the_most_recent():
    seqs, allocator = _slots([], [([1, 2, 3], 3), ([1, 2, 3], 3)])
    assert longest_prefix(WINDOW, seqs, allocator) == PrefixHit(1, 3, True)
    allocator.touch(0)
    assert longest_prefix(WINDOW, seqs, allocator) == PrefixHit(0, 3, True)


def test_a_free_slot_goes_to_the_earliest_group_with_the_fewest_running():
    scheduler = Scheduler(n_slots=3, prefill_chunk=8, token_budget=64)
    for rid, n in (("g1", 2), ("g2", 1), ("g3", 1)):
        for i in range(n):
            scheduler.add(_seq_of(rid, i))
    admitted = [s.group for s in scheduler.schedule().admitted]
    # g1 first (earliest, none running), then g2 and g3 (none running) before g1's second
    assert admitted == ["g1", "g2", "g3"], admitted
    assert scheduler._fairest_waiting(set()).group == "g1"
    assert scheduler._fairest_waiting({"g1"}) is None


def _seq_of(rid: str, index: int) -> Sequence:
    return Sequence(next(IDS), request(rid, [1, 2, 3], max_tokens=4), index, 64, 16, 0)
