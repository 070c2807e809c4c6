"""The engine against the oracle: nanoGPT's crop-the-context reference generator, which samples
with the definitions-first sampling oracle (``model.reference_sampling``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from engine_support import (
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    prompt_of,
    request,
    tiny_checkpoint,
)

from model import load_checkpoint
from model.cpu_gemv import CpuGemv, OneTokenForward
from model.generate import reference_steps
from service.engine.runner import ModelRunner

# (prompt length, max_tokens, arrival step): block_size is 32, so some prompts overflow the
# window and most generations run far past it.
MIX = [(5, 80), (20, 10), (40, 70), (1, 3), (31, 50), (12, 20), (32, 33), (70, 12)]
ARRIVALS = [0, 0, 3, 5, 5, 9, 9, 14]


def _reference_steps(checkpoint, req):
    p = req.params
    return reference_steps(
        checkpoint.model, list(req.prompt_token_ids), p.max_tokens, temperature=p.temperature,
        top_k=p.top_k or None, top_p=p.top_p, min_p=p.min_p, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
        logit_bias=dict(p.logit_bias), seed=p.seed, vocab_size=checkpoint.tokenizer.vocab_size,
        logprobs=p.logprobs,
    )


def _reference(checkpoint, req):
    return [step.token_id for step in _reference_steps(checkpoint, req)]


def _force_products(monkeypatch, prepack: str) -> list[int]:
    """Make the engine's warm-up keep the products ``prepack`` names; returns a list that grows
    by one at each call of the forced kernel."""
    calls = []
    if prepack == "forced":  # the oneDNN prepacked path for every row count, whatever the
        # warm-up's timing says
        monkeypatch.setattr(ModelRunner, "_choose_products",
                            lambda self, width: self.model.prepack_cpu_weights(True, (True, True)))
    elif prepack in ("kernel", "fused"):  # the project's one-row kernel (model.cpu_gemv) for
        # every one-row product (or, fused, each one-token step in one call), oneDNN for the
        # others
        def force(self, width):
            if self.gemv is None:
                pytest.skip("the one-row kernel is not built here (see the runner's log)")
            self.model.prepack_cpu_weights(True, (False, True))
            self.model.use_cpu_gemv(self.gemv, fused=prepack == "fused")
        monkeypatch.setattr(ModelRunner, "_choose_products", force)
        spied = (CpuGemv, "multiply") if prepack == "kernel" else (OneTokenForward, "__call__")
        original = getattr(*spied)
        monkeypatch.setattr(*spied, lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("prepack", ["timed", "forced", "kernel"])
@pytest.mark.parametrize("prefill_chunk", [8, 32])
def test_greedy_mixed_batch_matches_reference_past_block_size(prefill_chunk, prepack, monkeypatch):
    calls = _force_products(monkeypatch, prepack)
    ck = tiny_checkpoint()
    eng = engine(ck, max_batch_size=4, window_shift=1, prefill_chunk=prefill_chunk,
                 max_tokens_per_step=prefill_chunk + 8)
    reqs = [request(f"r{i}", prompt_of(n, i), max_tokens=m, temperature=0.0)
            for i, (n, m) in enumerate(MIX)]
    got = eng.generate(reqs, arrival_steps=ARRIVALS)
    for req, tokens in zip(reqs, got, strict=True):
        want = _reference(ck, req)
        assert tokens == want, (
            f"{req.request_id} (prompt {len(req.prompt_token_ids)}, max_tokens "
            f"{req.params.max_tokens}): engine {tokens} != reference {want}"
        )
    assert (prepack == "kernel") == bool(calls), "the one-row kernel ran only if forced"


@pytest.mark.parametrize("prepack", ["timed", "fused"])
def test_a_lone_sequence_matches_reference(prepack, monkeypatch):
    # one sequence decoding alone inside its window: one-token steps, the fused kernel's case
    # (past the window every step of the reference's crop re-encodes it: a chunk, not fused)
    calls = _force_products(monkeypatch, prepack)
    ck = tiny_checkpoint()
    eng = engine(ck, max_batch_size=2, window_shift=1)
    req = request("lone", prompt_of(5, 3), max_tokens=26, temperature=0.0)
    assert eng.generate([req])[0] == _reference(ck, req)
    assert (prepack == "fused") == (len(calls) == 25), f"{len(calls)} fused steps"


def test_seeded_sampling_matches_reference_token_for_token():
    ck = tiny_checkpoint()
    eng = engine(ck, max_batch_size=3, window_shift=1, prefill_chunk=16, max_tokens_per_step=32)
    settings = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3,
                top_p=0.8), dict(temperature=2.0)]
    reqs = [request(f"s{i}", prompt_of(7 + 9 * i, 100 + i), max_tokens=45, seed=11 * i, **kw)
            for i, kw in enumerate(settings)]
    got = eng.generate(reqs, arrival_steps=[0, 1, 1, 4])
    for req, tokens in zip(reqs, got, strict=True):
        assert tokens == _reference(ck, req), f"{req.request_id} diverged from the reference"


def test_penalties_bias_min_p_and_logprobs_match_the_reference_token_for_token():
    """The reference samples with the oracle (model.reference_sampling), which shares no code
    with the engine's sampler: tokens, logprobs and top logprobs agree past the window."""
    ck = tiny_checkpoint()
    eng = engine(ck, max_batch_size=3, window_shift=1, prefill_chunk=16, max_tokens_per_step=32)
    settings = [
        dict(temperature=2.0, frequency_penalty=1.5, logprobs=3),
        dict(temperature=2.0, presence_penalty=1.5, min_p=0.01, logprobs=2),
        dict(temperature=1.5, repetition_penalty=1.6, top_k=12, logit_bias={5: 4.0}, logprobs=5),
        dict(temperature=0.0, frequency_penalty=0.8, repetition_penalty=1.3, logprobs=1),
    ]
    reqs = [request(f"p{i}", prompt_of(6 + 5 * i, 200 + i), max_tokens=40, seed=3 + i, **kw)
            for i, kw in enumerate(settings)]
    events = eng.run(reqs, arrival_steps=[0, 1, 1, 3])
    for req in reqs:
        got = [e for e in events[req.request_id] if e.token_id is not None]
        want = _reference_steps(ck, req)
        rid = req.request_id
        assert [e.token_id for e in got] == [w.token_id for w in want], f"{rid}: tokens diverged"
        assert len(set(e.token_id for e in got)) > 1, f"{rid}: one token repeated: weak test"
        for t, (e, w) in enumerate(zip(got, want, strict=True)):
            assert e.logprob == pytest.approx(w.logprob, abs=1e-4), f"{rid} token {t}: logprob"
            mine = [(x.token_id, x.logprob) for x in e.top_logprobs if x.logprob > -math.inf]
            ref = [(j, lp) for j, lp in w.top if lp > -math.inf]
            assert [j for j, _ in mine] == [j for j, _ in ref], f"{rid} token {t}: top ids"
            assert [lp for _, lp in mine] == pytest.approx([lp for _, lp in ref], abs=1e-4)


def test_larger_window_shift_crops_less_often_and_counts_crops():
    ck = tiny_checkpoint()
    prompt = prompt_of(10, 3)
    counts = {}
    for shift in (1, 8):
        eng = engine(ck, max_batch_size=2, window_shift=shift, prefill_chunk=16)
        events = eng.run([request("a", prompt, max_tokens=60, temperature=0.0)])["a"]
        last = events[-1]
        # the window holds 32 tokens; the 33rd token of the sequence forces the first crop
        total = 10 + 60 - 1  # the last sampled token is never fed back
        expected = 0 if total <= 32 else -(-(total - 32) // shift)
        assert last.crops == expected, f"shift {shift}: {last.crops} crops, expected {expected}"
        assert not last.prompt_cropped
        counts[shift] = last.crops
    assert counts[8] < counts[1]


def test_prompt_longer_than_window_is_cropped_from_the_left():
    ck = tiny_checkpoint()
    eng = engine(ck, max_batch_size=1, window_shift=1, prefill_chunk=16)
    req = request("long", prompt_of(50, 9), max_tokens=5, temperature=0.0)
    events = eng.run([req])["long"]
    assert events[0].prompt_cropped and events[0].crops >= 1
    assert [e.token_id for e in events] == _reference(ck, req)
    assert events[-1].num_prompt_tokens == 50


SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "shakespeare-char"


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no shipped weights yet")
def test_shipped_weights_greedy_batch_matches_reference_past_block_size():
    ck = load_checkpoint(SHIPPED)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    block = ck.config.block_size
    prompts = [ck.tokenizer.encode(text[:n]) for n in (3, 17, len(text))]
    reqs = [request(f"w{i}", p, max_tokens=m, temperature=0.0)
            for i, (p, m) in enumerate(zip(prompts, (block + 20, 40, block), strict=True))]
    eng = engine(ck, max_batch_size=2, window_shift=1, prefill_chunk=64, max_tokens_per_step=96)
    got = eng.generate(reqs, arrival_steps=[0, 2, 5])
    for req, tokens in zip(reqs, got, strict=True):
        assert tokens == _reference(ck, req), f"{req.request_id}: shipped model diverged"


def test_step_stats_count_tokens_crops_and_slots():
    eng = engine(max_batch_size=3, window_shift=4, prefill_chunk=8, max_tokens_per_step=16)
    core = eng._core
    for i in range(4):
        core.add_request(request(f"r{i}", prompt_of(20 + i, i), max_tokens=30, temperature=0.0))
    crops = generated = prompt_tokens = 0
    finals = {}
    while core.has_work():
        result = core.step()
        s = result.stats
        assert s.num_running <= 3 and 0.0 <= s.kv_cache_usage <= 1.0
        assert s.kv_cache_usage == pytest.approx(s.num_running / 3)
        crops += s.crops
        generated += s.generation_tokens
        prompt_tokens += s.prompt_tokens
        finals.update({o.request_id: o for o in result.outputs.events() if o.finish_reason})
    assert generated == 4 * 30
    assert crops == sum(o.crops for o in finals.values()) > 0
    assert prompt_tokens >= sum(20 + i for i in range(4))
    assert s.kv_cache_usage == 0.0 and s.total_steps == core.total_steps
