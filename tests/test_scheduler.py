"""The scheduler's policies, table-driven, in plain Python (no model, no torch)."""

from __future__ import annotations

import pytest

from service.engine.scheduler import Scheduler, SlotAllocator
from service.engine.sequence import Sequence, SequenceStatus
from service.engine.types import FinishReason, Request, SamplingParams

BLOCK = 16


def _seq(i: int, prompt_len: int, shift: int = 4, max_tokens: int = 100,
         group: str | None = None, index: int = 0) -> Sequence:
    req = Request(f"r{i}", tuple(range(prompt_len)), SamplingParams(max_tokens=max_tokens),
                  group=group)
    return Sequence(i, req, index, BLOCK, shift, seed=0)


def _plan(plan):
    """A step's plan as plain data: decode ids and (id, start, end) prefill chunks."""
    return (sorted(c.seq.seq_id for c in plan.decode),
            [(c.seq.seq_id, c.start, c.end) for c in plan.prefill])


def _advance(plan):
    """What the engine does after running a plan: chunks are computed, chunks that complete
    their window emit a token (token 0), crops happen when the window is full."""
    for c in (*plan.decode, *plan.prefill):
        c.seq.num_computed = c.end
    for c in (*plan.decode, *plan.prefill):
        if c.end == c.seq.window_len:
            c.seq.append_token(0)
            c.seq.crop_if_full()


# (name, slots, prefill_chunk, budget, prompt lengths, expected plans for the first steps)
CASES = [
    ("one short prompt prefills in one chunk then decodes", 2, 8, 8, [5],
     [([], [(0, 0, 5)]), ([0], []), ([0], [])]),
    ("a long prompt is chunked; chunks depend only on the sequence", 2, 4, 8, [10],
     [([], [(0, 0, 4)]), ([], [(0, 4, 8)]), ([], [(0, 8, 10)]), ([0], [])]),
    ("prefill interleaves with running decodes; a last one-token chunk decodes", 2, 4, 5,
     [2, 9], [([], [(0, 0, 2)]), ([0], [(1, 0, 4)]), ([0], [(1, 4, 8)]), ([0, 1], []),
              ([0, 1], [])]),
    ("admission waits for a free slot (FIFO)", 1, 8, 8, [3, 3],
     [([], [(0, 0, 3)]), ([0], []), ([0], [])]),
    ("the token budget defers the next chunk to the next step", 3, 4, 6, [4, 4, 4],
     [([], [(0, 0, 4)]), ([0], [(1, 0, 4)]), ([0, 1], [(2, 0, 4)]), ([0, 1, 2], [])]),
    ("a chunk larger than what decodes leave still runs (no starvation)", 4, 4, 4,
     [1, 1, 1, 4], [([0, 1, 2], [(3, 0, 4)]), ([0, 1, 2, 3], [])]),
    ("a prompt longer than the window is cropped from the left in shifts", 1, 16, 16, [18],
     [([], [(0, 0, 14)]), ([0], [])]),
]


@pytest.mark.parametrize("name,slots,chunk,budget,prompts,expected", CASES,
                         ids=[c[0] for c in CASES])
def test_schedule_table(name, slots, chunk, budget, prompts, expected):
    sched = Scheduler(slots, chunk, budget)
    for i, n in enumerate(prompts):
        sched.add(_seq(i, n))
    for step, want in enumerate(expected):
        plan = sched.schedule()
        assert _plan(plan) == want, f"{name}: step {step} planned {_plan(plan)}, want {want}"
        _advance(plan)


def test_window_overflow_triggers_a_crop_and_a_re_encode():
    sched = Scheduler(1, 8, 8)
    seq = _seq(0, 15, shift=4)
    sched.add(seq)
    plans = []
    for _ in range(5):
        plan = sched.schedule()
        plans.append(_plan(plan))
        _advance(plan)
    # prompt 15 -> 2 chunks, token 16 fills the window, token 17 forces a crop (drop 4):
    # the window is re-encoded from position 0 (13 tokens), then decoding resumes.
    assert plans == [([], [(0, 0, 8)]), ([], [(0, 8, 15)]), ([0], []), ([], [(0, 0, 8)]),
                     ([], [(0, 8, 13)])]
    assert seq.crops == 1 and seq.window_start == 4


@pytest.mark.parametrize("status", ["waiting", "running"])
def test_finish_frees_the_slot_immediately(status):
    sched = Scheduler(1, 8, 8)
    a, b = _seq(0, 3), _seq(1, 3)
    sched.add(a)
    sched.add(b)
    _advance(sched.schedule())
    victim = b if status == "waiting" else a
    sched.finish(victim, FinishReason.ABORT)
    assert victim.status is SequenceStatus.FINISHED
    assert sched.find(victim.request_id) == []
    if status == "running":
        assert sched.slots.num_free == 1
        assert _plan(sched.schedule()) == ([], [(1, 0, 3)]), "b should take the freed slot"


@pytest.mark.parametrize("ops,expected_usage", [
    (["alloc", "alloc"], 0.5), (["alloc", "alloc", "free0"], 0.25), ([], 0.0),
    (["alloc"] * 4, 1.0),
])
def test_slot_allocator_usage(ops, expected_usage):
    slots = SlotAllocator(4)
    for op in ops:
        if op == "alloc":
            slots.allocate()
        else:
            slots.free(int(op[-1]))
    assert slots.usage == expected_usage


def test_slot_allocator_hands_out_the_lowest_free_slot_and_rejects_double_free():
    slots = SlotAllocator(3)
    assert [slots.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="no free slot"):
        slots.allocate()
    slots.free(1)
    assert slots.allocate() == 1
    slots.free(2)
    with pytest.raises(ValueError):
        slots.free(2)


def test_a_small_request_is_admitted_before_the_rest_of_a_big_one():
    sched = Scheduler(2, 8, 64)
    big = [_seq(i, 3, group="big", index=i) for i in range(6)]
    for seq in big:
        sched.add(seq)
    _advance(sched.schedule())  # big's choices 0 and 1 take both slots
    small = _seq(9, 3, group="small")
    sched.add(small)
    sched.finish(big[0], FinishReason.STOP)
    plan = sched.schedule()
    assert plan.admitted == (small,), "the request with nothing running goes first"
    sched.finish(big[1], FinishReason.STOP)
    assert sched.schedule().admitted == (big[2],), "then the big request resumes, in order"


def test_decode_rows_come_in_slot_order():
    sched = Scheduler(3, 8, 64)
    seqs = [_seq(i, 2 + i) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    _advance(sched.schedule())
    sched.finish(seqs[0], FinishReason.STOP)
    sched.add(late := _seq(7, 1))  # a one-token prompt decodes at once, in the freed slot 0
    plan = sched.schedule()
    assert [c.seq.slot for c in plan.decode] == [0, 1, 2] and plan.decode[0].seq is late


def test_scheduler_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, service.engine.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "the scheduler must stay plain Python"
