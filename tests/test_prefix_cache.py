"""Prefix reuse in the scheduler and the slot allocator, in plain Python (no model, no torch):
which slot a sequence gets, which prefix it starts from, what is kept and what is evicted."""

from __future__ import annotations

import pytest

from service.engine.scheduler import Scheduler
from service.engine.sequence import Sequence
from service.engine.slots import SlotAllocator, SlotCopy, common_prefix
from service.engine.types import FinishReason, Request, SamplingParams

BLOCK = 16


def _seq(i: int, prompt: list[int], shift: int = 4, block: int = BLOCK) -> Sequence:
    req = Request(f"r{i}", tuple(prompt), SamplingParams(max_tokens=100))
    return Sequence(i, req, 0, block, shift, seed=0)


def _run_prompt(sched: Scheduler, seq: Sequence) -> None:
    """Admit ``seq`` and compute its whole prompt (what the engine does), sampling token 99."""
    sched.add(seq)
    while seq.num_computed < seq.window_len:
        plan = sched.schedule()
        for c in (*plan.decode, *plan.prefill):
            c.seq.num_computed = c.end
    seq.append_token(99)


def _admit(sched: Scheduler, seq: Sequence):
    sched.add(seq)
    plan = sched.schedule()
    assert seq in plan.admitted, "the sequence should be admitted at once"
    chunk = next(c for c in (*plan.decode, *plan.prefill) if c.seq is seq)
    return plan, chunk


def test_a_finished_sequences_slot_is_taken_over_by_a_prompt_sharing_its_prefix():
    sched = Scheduler(2, 8, 16, prefix_caching=True)
    a = _seq(0, [1, 2, 3, 4, 5, 6])
    _run_prompt(sched, a)
    sched.finish(a, FinishReason.STOP)
    assert sched.slots.num_cached == 1 and sched.slots.num_free == 2
    plan, chunk = _admit(sched, _seq(1, [1, 2, 3, 4, 7, 8, 9]))
    assert (chunk.seq.slot, chunk.start, chunk.end) == (0, 4, 7), "should start after 1 2 3 4"
    assert plan.copies == (), "the finished sequence's own slot needs no copy"
    assert chunk.seq.num_cached_tokens == 4 and sched.slots.num_cached == 0


def test_a_running_sequences_prefix_is_copied_into_the_new_slot():
    sched = Scheduler(3, 8, 16, prefix_caching=True)
    a = _seq(0, [1, 2, 3, 4, 5, 6])
    _run_prompt(sched, a)  # a decodes on in slot 0
    plan, chunk = _admit(sched, _seq(1, [1, 2, 3, 4, 5, 6, 7]))
    assert plan.copies == (SlotCopy(source=0, target=1, length=6),)
    assert (chunk.start, chunk.end) == (6, 7)


def test_the_last_prompt_token_is_always_computed_for_its_logits():
    sched = Scheduler(2, 8, 16, prefix_caching=True)
    a = _seq(0, [1, 2, 3, 4, 5, 6])
    _run_prompt(sched, a)
    sched.finish(a, FinishReason.LENGTH)
    plan, chunk = _admit(sched, _seq(1, [1, 2, 3, 4, 5, 6]))
    assert (chunk.start, chunk.end) == (5, 6) and chunk.samples
    assert chunk in plan.decode, "a one-token chunk that samples runs with the decodes"


def test_cached_slots_never_delay_admission():
    sched = Scheduler(2, 8, 32, prefix_caching=True)
    first = [_seq(i, [10 + i] * 5) for i in range(2)]
    for seq in first:
        sched.add(seq)
    for c in sched.schedule().prefill:  # both prompts in one step
        c.seq.num_computed = c.end
    for seq in first:
        sched.finish(seq, FinishReason.STOP)
    assert sched.slots.num_cached == 2
    for i in range(2, 4):
        sched.add(_seq(i, [20 + i] * 5))
    plan = sched.schedule()
    assert len(plan.admitted) == 2, "both new sequences should take the cached slots at once"
    assert sched.slots.num_cached == 0 and sched.slots.usage == 1.0


def test_when_every_slot_is_in_use_the_least_recently_used_entry_is_evicted():
    slots = SlotAllocator(3)
    seqs = {s: _seq(s, [s + 1] * 3) for s in range(3)}
    for s, seq in seqs.items():
        assert slots.allocate() == s
        seq.num_computed = 3
    for s in (1, 0, 2):  # finished in this order: 1 is the least recently used
        slots.free(s, seqs[s])
    slots.touch(1)  # ...until something reads it: now 0 is
    slots.take(2)  # a new sequence continues 2's prefix; the decode batch is 3 wide
    assert slots.allocate() == 0 and slots.allocate() == 1
    assert slots.num_cached == 0 and slots.usage == 1.0


def test_an_idle_server_keeps_the_decode_batch_narrow_rather_than_the_cache_full():
    """The decode batch reads every slot below the highest busy one: a new sequence with
    nothing to reuse takes the lowest slot rather than widen it around a cached entry."""
    sched = Scheduler(4, 8, 16, prefix_caching=True)
    for i in range(3):
        seq = _seq(i, [30 + i] * 4)
        _run_prompt(sched, seq)
        assert seq.slot == 0, f"request {i} alone should run in slot 0, got {seq.slot}"
        sched.finish(seq, FinishReason.STOP)


def test_a_crop_withdraws_a_window_until_it_is_re_encoded():
    sched = Scheduler(3, 16, 32, prefix_caching=True)
    a = _seq(0, list(range(1, 17)), shift=4)  # fills the 16-token window
    _run_prompt(sched, a)
    a.num_computed = a.window_len  # token 99 computed too
    a.append_token(98)
    assert a.crop_if_full() and a.num_computed == 0
    b = _seq(1, list(range(5, 14)))  # the start of a's new window, not yet re-encoded
    plan, chunk = _admit(sched, b)
    assert chunk.start == 0 and plan.copies == (), "a cropped window offers no prefix"
    for c in plan.prefill:  # a re-encodes 5..16, 99, 98 at positions 0..13
        c.seq.num_computed = c.end
    c = _seq(2, [*range(5, 17), 99, 98, 7])
    sched.slots.free(b.slot)  # room for c
    sched.running.remove(b)
    plan, chunk = _admit(sched, c)
    assert plan.copies == (SlotCopy(source=a.slot, target=chunk.seq.slot, length=14),)


def test_a_prompt_waits_for_the_running_sequence_that_computes_its_prefix():
    """Two requests with one 30-token system prompt arrive together: the second waits while
    the first computes it (8-token chunks), joins when less than a chunk is left, and an
    unrelated request is admitted meanwhile."""
    sched = Scheduler(4, 8, 32, prefix_caching=True)
    system = list(range(1, 31))
    a, b = _seq(0, [*system, 40, 41], block=64), _seq(1, [*system, 50, 51], block=64)
    other = _seq(2, [60, 61, 62])
    for seq in (a, b, other):
        sched.add(seq)
    plans = []
    for _ in range(4):
        plan = sched.schedule()
        plans.append(([seq.seq_id for seq in plan.admitted],
                      [(c.seq.seq_id, c.start, c.end) for c in plan.prefill]))
        for c in (*plan.decode, *plan.prefill):
            c.seq.num_computed = c.end
    assert plans == [
        ([0, 2], [(0, 0, 8), (2, 0, 3)]),  # b waits; the unrelated request does not
        ([], [(0, 8, 16)]),
        ([], [(0, 16, 24)]),
        ([1], [(0, 24, 32), (1, 24, 32)]),  # 30 - 24 < 8 left: b joins from a's 24 tokens
    ], plans


@pytest.mark.parametrize("reason,kept", [(FinishReason.STOP, True), (FinishReason.ABORT, True),
                                         (FinishReason.ERROR, False)])
def test_only_a_clean_end_leaves_a_slot_cached(reason, kept):
    sched = Scheduler(1, 8, 16, prefix_caching=True)
    a = _seq(0, [1, 2, 3])
    _run_prompt(sched, a)
    sched.finish(a, reason)
    assert sched.slots.num_cached == int(kept)


def test_with_prefix_caching_off_nothing_is_kept_or_reused():
    sched = Scheduler(2, 8, 16)
    a = _seq(0, [1, 2, 3, 4])
    _run_prompt(sched, a)
    plan, chunk = _admit(sched, _seq(1, [1, 2, 3, 4]))
    assert chunk.start == 0 and plan.copies == ()
    sched.finish(a, FinishReason.STOP)
    assert sched.slots.num_cached == 0


@pytest.mark.parametrize("a,b,start,limit,expected", [
    ([1, 2, 3], [1, 2, 3], 0, 3, 3), ([1, 2, 3], [1, 2, 4], 0, 3, 2), ([1, 2], [9, 1, 2], 1, 2, 2),
    ([1, 2, 3], [1, 2, 3], 0, 2, 2), ([5], [1], 0, 1, 0), ([1] * 9 + [2], [1] * 10, 0, 10, 9),
    ([1, 2], [1, 2], 0, 0, 0),
])
def test_common_prefix(a, b, start, limit, expected):
    assert common_prefix(a, b, start, limit) == expected
