"""Stop conditions, n > 1, logprobs, cancellation at every stage, and per-request metrics."""

from __future__ import annotations

import math

import pytest
from engine_support import (
    CHARS,
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    prompt_of,
    record_prefill_chunks,
    request,
    tiny_checkpoint,
    with_eos,
)

from model.sampling import choice_seed
from service.engine import FinishReason, InvalidRequestError
from service.engine.sequence import SequenceStatus


def _tokens(events):
    return [e.token_id for e in events if e.token_id is not None]


def test_max_tokens_finishes_with_length_and_metrics():
    events = engine(max_batch_size=2).run([request("a", "hello", max_tokens=7)])["a"]
    assert len(_tokens(events)) == 7
    assert [e.finish_reason for e in events] == [None] * 6 + [FinishReason.LENGTH]
    assert [e.num_generated_tokens for e in events] == list(range(1, 8))
    m = events[-1].metrics
    assert m is not None and m.num_tokens == 7
    assert 0 <= m.queue_time <= m.time_to_first_token <= m.e2e_latency


def test_stop_token_id_ends_the_choice_after_emitting_it():
    ck = tiny_checkpoint()
    free = _tokens(engine(ck).run([request("a", "abc", max_tokens=30, temperature=0.0)])["a"])
    stop = free[5]
    first = free.index(stop)
    events = engine(ck).run([request("a", "abc", max_tokens=30, temperature=0.0,
                                     stop_token_ids=[stop])])["a"]
    assert _tokens(events) == free[: first + 1]
    assert events[-1].finish_reason is FinishReason.STOP


def test_eos_stops_unless_ignore_eos():
    ck = with_eos(tiny_checkpoint())
    eos = CHARS.index("\n")
    bias = {eos: 100.0}  # make eos the certain next token
    events = engine(ck).run([request("a", "abc", max_tokens=9, logit_bias=bias)])["a"]
    assert _tokens(events) == [eos] and events[-1].finish_reason is FinishReason.STOP
    events = engine(ck).run([request("a", "abc", max_tokens=9, logit_bias=bias,
                                     ignore_eos=True)])["a"]
    assert _tokens(events) == [eos] * 9 and events[-1].finish_reason is FinishReason.LENGTH


def test_n_choices_are_separate_seeded_sequences():
    eng = engine(max_batch_size=4)
    events = eng.run([request("a", "xyz", max_tokens=20, n=3, seed=42, temperature=1.5)])["a"]
    by_index = {i: _tokens([e for e in events if e.index == i]) for i in range(3)}
    assert all(len(t) == 20 for t in by_index.values())
    assert len({tuple(t) for t in by_index.values()}) == 3, "choices should differ"
    again = engine(max_batch_size=4).run([request("b", "xyz", max_tokens=20, n=3, seed=42,
                                                  temperature=1.5)])["b"]
    assert _tokens(sorted(again, key=lambda e: e.index)) == _tokens(
        sorted(events, key=lambda e: e.index)), "seeded choices are not reproducible"
    assert sum(e.finish_reason is not None for e in events) == 3


def test_choices_of_nearby_seeds_are_not_shifted_copies_of_each_other():
    """Choice j used to draw with seed + j, so (seed=1, n=3) and (seed=2, n=3) shared two
    choices; every choice's seed is now a hash of (seed, j)."""
    def choices(seed):
        events = engine(max_batch_size=4).run(
            [request("a", "xyz", max_tokens=20, n=3, seed=seed, temperature=1.5)])["a"]
        return {tuple(_tokens([e for e in events if e.index == i])) for i in range(3)}

    assert not choices(1) & choices(2), "nearby seeds share choices"


def test_logprobs_are_log_probabilities_of_the_sampled_distribution():
    events = engine().run([request("a", "abc", max_tokens=5, temperature=0.0, logprobs=3)])["a"]
    for e in events:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token_id == e.token_id
        assert e.logprob == e.top_logprobs[0].logprob <= 0.0
    events = engine().run([request("b", "abc", max_tokens=5, top_k=2, seed=1, logprobs=2)])["b"]
    for e in events:
        total = sum(math.exp(t.logprob) for t in e.top_logprobs)
        assert abs(total - 1.0) < 1e-5, "top-2 filtered distribution must hold all the mass"


def _core_with(eng, *reqs):
    core = eng._core
    for r in reqs:
        core.add_request(r)
    return core


@pytest.mark.parametrize("stage", ["queued", "prefill", "decode"])
def test_abort_frees_the_slot_before_the_next_step(stage):
    eng = engine(max_batch_size=1, prefill_chunk=8, max_tokens_per_step=8)
    core = _core_with(eng, request("a", prompt_of(30, 1), max_tokens=50),
                      request("b", prompt_of(3, 2), max_tokens=2))
    steps = {"queued": 0, "prefill": 1, "decode": 5}[stage]
    for _ in range(steps):
        core.step()
    target = "b" if stage == "queued" else "a"
    seq = core.scheduler.find(target)[0]
    want = SequenceStatus.WAITING if stage == "queued" else SequenceStatus.RUNNING
    assert seq.status is want
    if stage != "queued":  # mid-prefill: part of the prompt computed; decoding: one token left
        assert (seq.num_to_compute > 1) == (stage == "prefill"), seq.num_to_compute
    [out] = core.abort(target).events()
    assert out.finish_reason is FinishReason.ABORT and out.token_id is None
    assert out.metrics is not None
    assert core.scheduler.find(target) == []
    if stage != "queued":
        assert core.scheduler.slots.num_free == 1, "the aborted sequence still holds its slot"
        step = core.step()  # the other request is admitted at once
        assert step.stats.num_running == 1
    assert core.abort(target).events() == []  # aborting twice is a no-op


def test_invalid_prompts_name_the_prompt_param():
    eng = engine()
    for prompt in ([], [len(CHARS)], [-1]):
        with pytest.raises(InvalidRequestError) as err:
            eng.validate(request("a", prompt, max_tokens=1))
        assert err.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as err:
        eng.validate(request("a", "ab", max_tokens=1, logit_bias={len(CHARS): 1.0}))
    assert err.value.param == "logit_bias"


def test_n_choices_encode_the_prompt_once_and_equal_separate_seeded_requests():
    ck = tiny_checkpoint()
    prompt = prompt_of(20, 4)
    eng = engine(ck, max_batch_size=4, prefill_chunk=8)
    encoded = record_prefill_chunks(eng)
    together = eng.generate([request("a", prompt, max_tokens=12, n=3, seed=7, temperature=1.2)])
    assert sorted(encoded) == [(0, 8), (8, 8), (16, 4)], f"prompt chunks encoded {encoded}"
    apart = engine(ck, max_batch_size=4, prefill_chunk=8).generate(
        [request(f"s{i}", prompt, max_tokens=12, seed=choice_seed(7, i), temperature=1.2)
         for i in range(3)])
    assert together == apart, "sharing the prompt changed a choice's tokens"
