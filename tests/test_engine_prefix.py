"""Prefix reuse against the oracle: with prompts that share prefixes (a system prompt, a resent
conversation, n siblings), the engine reuses cached keys and values and still generates exactly
what nanoGPT's crop-the-context reference generates, inside and past the window."""

from __future__ import annotations

import pytest
from engine_support import (
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    prompt_of,
    record_prefill_chunks,
    request,
    tiny_checkpoint,
)
from test_engine_reference import _reference_steps

from model.sampling import choice_seed


def _cached(events) -> int:
    """Prompt tokens a choice reused (its finishing event says, like every event)."""
    return events[-1].num_cached_tokens


def _tokens(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def _logprobs(events) -> list[float]:
    return [e.logprob for e in events if e.token_id is not None]


def _check(ck, reqs, events, baseline=None):
    """Each request's tokens and their logprobs equal the reference's (window_shift 1:
    nanoGPT's crop), or with a larger shift, the same engine's with prefix caching off
    (``baseline``: its events). The test model's greedy tokens hardly depend on anything but
    the position and the last token, so only the logprobs show a wrong reused key."""
    for req in reqs:
        rid = req.request_id
        got, logprobs = _tokens(events[rid]), _logprobs(events[rid])
        if baseline is None:
            steps = _reference_steps(ck, req)
            want, want_logprobs = [s.token_id for s in steps], [s.logprob for s in steps]
        else:
            want, want_logprobs = _tokens(baseline[rid]), _logprobs(baseline[rid])
        what = f"{rid} (prompt {len(req.prompt_token_ids)}, reused {_cached(events[rid])})"
        assert got == want, f"{what}: engine {got} != {want}"
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4), f"{what}: logprobs differ"


@pytest.mark.parametrize("window_shift", [1, 8])
def test_greedy_shared_prefixes_match_reference_past_block_size(window_shift):
    """A system prompt with different user parts, exact repeats and extensions, arriving while
    earlier ones run (a live prefix is copied) and after they finished (a cached slot is taken
    over or copied), most generating past the 32-token window."""
    ck = tiny_checkpoint()
    system = prompt_of(14, 50)
    prompts = [system + prompt_of(3 + i % 5, 60 + i) for i in range(8)]
    prompts += [prompts[0], prompts[1] + prompt_of(4, 70), system, system[:9] + prompt_of(25, 71)]
    max_tokens = [40, 8, 30, 3, 50, 12, 25, 5, 40, 20, 35, 10]
    reqs = [request(f"r{i}", p, max_tokens=m, temperature=0.0, logprobs=0)
            for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
    arrivals = [0, 0, 2, 3, 3, 6, 10, 11, 25, 30, 31, 60]
    config = dict(max_batch_size=4, window_shift=window_shift, prefill_chunk=8,
                  max_tokens_per_step=16)
    events = engine(ck, **config).run(reqs, arrival_steps=arrivals)
    baseline = None
    if window_shift > 1:  # the reference crops one token at a time
        baseline = engine(ck, **config, prefix_caching=False).run(reqs, arrival_steps=arrivals)
    _check(ck, reqs, events, baseline)
    reused = {r.request_id: _cached(events[r.request_id]) for r in reqs}
    assert reused["r0"] == 0, "nothing was cached before the first request"
    assert sum(n >= len(system) for n in reused.values()) >= 6, f"too little reuse: {reused}"
    assert reused["r10"] == len(system) - 1, "a prompt equal to a cached prefix: all but one"


def test_a_resent_conversation_reuses_the_cropped_window_it_ended_with():
    """A turn that ran past the window ends with a slid window; the next turn resends the
    conversation plus a few tokens, and its own window starts where the slid one does (windows
    slide in steps of window_shift): that window is reused."""
    ck = tiny_checkpoint()
    config = dict(max_batch_size=2, window_shift=8, prefill_chunk=8, max_tokens_per_step=16)
    eng = engine(ck, **config)
    first = request("turn1", prompt_of(20, 80), max_tokens=30, temperature=0.0, logprobs=0)
    out = eng.run([first])["turn1"]
    assert out[-1].crops == 3, "the first turn should slide its window to token 24"
    conversation = [*first.prompt_token_ids, *_tokens(out), *prompt_of(2, 81)]  # 52 tokens
    second = [request("turn2", conversation, max_tokens=20, temperature=0.0, logprobs=0)]
    events = eng.run(second)
    _check(ck, second, events, engine(ck, **config, prefix_caching=False).run(second))
    # both windows start at token 24; the first turn computed tokens 24..48
    assert _cached(events["turn2"]) == 25


def test_siblings_prefill_once_and_equal_separate_seeded_requests():
    """n=5 on 2 slots: the second choice waits while the first computes the prompt, joins it
    for the last chunk (computed once, copied), and the other three start from a finished
    sibling's cached slot and compute only the last prompt token (the choices stop inside the
    window: a slid window would no longer start with the prompt)."""
    ck = tiny_checkpoint()
    prompt = prompt_of(21, 4)
    eng = engine(ck, max_batch_size=2, prefill_chunk=8, window_shift=1)
    encoded = record_prefill_chunks(eng)
    events = eng.run([request("a", prompt, max_tokens=10, n=5, seed=7, temperature=1.2,
                              logprobs=0)])["a"]
    assert sorted(encoded) == [(0, 8), (8, 8), (16, 5)], f"prompt chunks encoded {encoded}"
    finals = {e.index: e for e in events if e.finish_reason}
    assert [finals[i].num_cached_tokens for i in range(5)] == [0, 16, 20, 20, 20]
    for i in range(5):
        sibling = request(f"s{i}", prompt, max_tokens=10, seed=choice_seed(7, i),
                          temperature=1.2, logprobs=0)
        mine = [e for e in events if e.index == i]
        _check(ck, [sibling], {f"s{i}": mine})


def test_eviction_under_pressure_keeps_outputs_exact():
    """Three prompt families through two slots: entries are evicted and re-made all the time;
    every output still equals the reference, and a family member whose entry was evicted
    starts from scratch."""
    ck = tiny_checkpoint()
    families = [prompt_of(12, 90 + f) for f in range(3)]
    reqs, arrivals = [], []
    for i in range(12):
        family = families[(i * 7) % 3]
        reqs.append(request(f"e{i}", family + prompt_of(1 + i % 4, 100 + i),
                            max_tokens=3 + (5 * i) % 13, temperature=0.0, logprobs=0))
        arrivals.append(4 * i)
    eng = engine(ck, max_batch_size=2, window_shift=1, prefill_chunk=8, max_tokens_per_step=16)
    events = eng.run(reqs, arrival_steps=arrivals)
    _check(ck, reqs, events)
    reused = [_cached(events[r.request_id]) for r in reqs]
    assert any(n >= 12 for n in reused), f"no family prefix was reused: {reused}"
    seen = {tuple(families[(i * 7) % 3]) for i in range(3)}
    assert any(n == 0 for n in reused[3:]) and len(seen) == 3, (
        f"every later request found its family cached: no eviction was tested ({reused})")


def test_prefix_caching_off_reuses_nothing():
    ck = tiny_checkpoint()
    eng = engine(ck, max_batch_size=2, prefix_caching=False)
    prompt = prompt_of(10, 5)
    events = eng.run([request("a", prompt, max_tokens=4), request("b", prompt, max_tokens=4)],
                     arrival_steps=[0, 10])
    assert _cached(events["a"]) == _cached(events["b"]) == 0
