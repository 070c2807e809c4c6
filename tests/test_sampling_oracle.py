"""The engine's vectorised sampler against the sampling oracle (``model.reference_sampling``),
which is written from the definitions and shares no code with it: token, logprob and top
logprobs agree at every step, for every parameter alone and together, in a mixed batch.

The oracle is first checked against numbers worked out by hand, so the two cannot agree on
the same mistake."""

from __future__ import annotations

import math
import os

import pytest
import torch

from model.reference_sampling import (
    ReferenceParams,
    counter_uniform,
    distribution,
    next_token,
    processed_logits,
)
from model.sampling import counter_uniforms
from service.engine.sampler import Sampler
from service.engine.sequence import Sequence
from service.engine.types import Request, SamplingParams

V_MODEL, V_TOKENIZER = 40, 37  # ids 37..39 are embedding padding
PROMPT = (1, 2, 2, 7)


# ---- the oracle against hand-worked numbers ---------------------------------------------------

def test_oracle_penalties_follow_the_openai_and_ctrl_definitions():
    logits = [2.0, -1.0, 1.0, 1.0, 0.5, 3.0]
    prompt, generated = [0, 1], [3, 3, 4]  # token 3 generated twice, 4 once; 0, 1 in the prompt
    freq = processed_logits(logits, ReferenceParams(frequency_penalty=0.5), prompt, generated)
    assert freq == [2.0, -1.0, 1.0, 0.0, 0.0, 3.0], "frequency: minus count x penalty"
    pres = processed_logits(logits, ReferenceParams(presence_penalty=0.5), prompt, generated)
    assert pres == [2.0, -1.0, 1.0, 0.5, 0.0, 3.0], "presence: minus penalty once per seen token"
    rep = processed_logits(logits, ReferenceParams(repetition_penalty=2.0), prompt, generated)
    assert rep == [1.0, -2.0, 1.0, 0.5, 0.25, 3.0], "repetition: prompt and output, by sign"
    bias = processed_logits(logits, ReferenceParams(logit_bias=((5, -4.0),)), prompt, generated)
    assert bias == [2.0, -1.0, 1.0, 1.0, 0.5, -1.0]
    padded = processed_logits(logits, ReferenceParams(), prompt, generated, vocab_size=4)
    assert padded[4:] == [-math.inf, -math.inf]


def test_oracle_filters_keep_exactly_the_right_tokens():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]

    def probs(**kw):
        return [round(p, 9) for p in distribution(logits, ReferenceParams(**kw))]

    assert probs(top_k=2) == [0.625, 0.375, 0.0, 0.0]
    assert probs(top_p=0.79) == [0.625, 0.375, 0.0, 0.0]  # 0.5 + 0.3 passes 0.79
    assert probs(top_p=0.81) == [round(p / 0.95, 9) for p in (0.5, 0.3, 0.15)] + [0.0]
    assert probs(min_p=0.2) == [round(p / 0.95, 9) for p in (0.5, 0.3, 0.15)] + [0.0]
    # temperature 0.5 squares the odds: 25 : 9 : 2.25 : 0.25
    assert probs(temperature=0.5) == [round(x / 36.5, 9) for x in (25, 9, 2.25, 0.25)]
    # each filter renormalises what the previous one kept: top-k 3 leaves .5/.95, .3/.95,
    # .15/.95; top_p 0.81 then keeps the first two (0.526 + 0.316 >= 0.81); on the raw
    # probabilities it would have kept three (0.5 + 0.3 < 0.81)
    assert probs(top_k=3, top_p=0.81) == [0.625, 0.375, 0.0, 0.0]


def test_oracle_draws_by_inverse_cdf_and_reports_logprobs():
    logits = [math.log(p) for p in (0.5, 0.3, 0.2)]
    params = ReferenceParams(temperature=1.0)
    seen = set()
    for seed in range(200):  # cumulative mass 0.5, 0.8, 1.0: u picks the interval it falls in
        u = counter_uniform(seed, 0)
        want = 0 if u < 0.5 else 1 if u < 0.8 else 2
        step = next_token(logits, params, prompt=[0], generated=[], seed=seed, logprobs=2)
        assert step.token_id == want, f"seed {seed}: u = {u} drew {step.token_id}, not {want}"
        assert step.logprob == pytest.approx(logits[want])
        assert [j for j, _ in step.top] == [0, 1]
        seen.add(want)
    assert seen == {0, 1, 2}
    greedy = next_token([0.0, 2.0, 1.0], ReferenceParams(temperature=0.0), prompt=[0],
                        generated=[], seed=0, logprobs=1)
    norm = math.log(1 + math.e**2 + math.e)
    assert greedy.token_id == 1 and greedy.logprob == pytest.approx(2.0 - norm)


def test_oracle_uniforms_re_implement_the_engine_s_counter_definition():
    seeds = [0, 1, 7, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1]
    counters = [0, 1, 2, 1000, 2**31, 2**32 - 1]
    pairs = [(s, c) for s in seeds for c in counters]
    engine = counter_uniforms(torch.tensor([s for s, _ in pairs]),
                              torch.tensor([c for _, c in pairs])).tolist()
    assert engine == [counter_uniform(s, c) for s, c in pairs]


# ---- the engine's sampler against the oracle --------------------------------------------------

CASES = {
    "temperature": dict(temperature=0.6),
    "top_k": dict(temperature=1.0, top_k=3),
    "top_p": dict(temperature=1.3, top_p=0.6),
    "min_p": dict(temperature=1.0, min_p=0.15),
    "filters together": dict(temperature=0.9, top_k=8, top_p=0.85, min_p=0.05),
    "frequency": dict(temperature=1.0, frequency_penalty=1.5),
    "presence": dict(temperature=1.0, presence_penalty=1.5),
    "negative frequency": dict(temperature=1.0, frequency_penalty=-0.7),
    "repetition": dict(temperature=1.0, repetition_penalty=1.8),
    "logit_bias": dict(temperature=1.0, logit_bias={5: 3.0, 0: -100.0}),
    "greedy": dict(temperature=0.0),
    "greedy with penalties and bias": dict(temperature=0.0, frequency_penalty=0.6,
                                           presence_penalty=0.4, repetition_penalty=1.3,
                                           logit_bias={3: 1.5}),
    "everything": dict(temperature=0.8, top_k=10, top_p=0.95, min_p=0.02, frequency_penalty=0.5,
                       presence_penalty=0.3, repetition_penalty=1.2, logit_bias={4: 2.0}),
}


def _logits(g: torch.Generator, rows: int) -> torch.Tensor:
    """Peaked logits that favour a few tokens, so tokens repeat and penalties matter."""
    base = torch.zeros(V_MODEL)
    base[:6] = torch.tensor([2.5, 2.0, 1.5, 1.5, 1.0, 0.5])
    return base + 1.2 * torch.randn(rows, V_MODEL, generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_the_oracle_at_every_step(case):
    """Row 0 asks for ``case`` with logprobs, row 1 for ``case`` without (the sampler skips
    work then), row 2 is a plain sampled neighbour; 40 steps of fresh logits each."""
    rows = [dict(CASES[case], logprobs=5, seed=11), dict(CASES[case], seed=12),
            dict(temperature=1.0, seed=13)]
    device = torch.device(os.environ.get("GPTSERVE_TEST_DEVICE", "cpu"))  # as engine_support
    sampler = Sampler(4, V_MODEL, V_TOKENIZER, device)
    seqs = []
    for slot, kw in enumerate(rows):
        request = Request(f"r{slot}", PROMPT, SamplingParams.create(max_tokens=100, **kw))
        seq = Sequence(slot, request, 0, 64, 1, seed=kw["seed"])
        seq.admit(slot)
        sampler.start(seq)
        seqs.append(seq)
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    repeated = False
    for step in range(40):
        logits = _logits(g, len(rows))
        got = sampler(logits.to(device), seqs)  # one step's draws as columns
        for row, (seq, token_id) in enumerate(zip(seqs, got.token_ids, strict=True)):
            logprob = None if got.logprobs is None else got.logprobs[row]
            top_logprobs = None if got.top_logprobs is None else got.top_logprobs[row]
            generated = seq.tokens[seq.num_prompt_tokens :]
            want = next_token(logits[row].tolist(), ReferenceParams.like(seq.params),
                              prompt=PROMPT, generated=generated, seed=seq.seed,
                              vocab_size=V_TOKENIZER, logprobs=seq.params.logprobs)
            where = f"{case}, row {row}, step {step}"
            assert token_id in want.plausible, (
                f"{where}: sampler drew {token_id}, the oracle {want.token_id}")
            if want.logprob is not None:
                assert logprob == pytest.approx(want.logprob, abs=1e-4), where
                finite = [(j, lp) for j, lp in want.top if lp > -math.inf]
                got_top = [(t.token_id, t.logprob) for t in top_logprobs
                           if t.logprob > -math.inf]
                assert [j for j, _ in got_top] == [j for j, _ in finite], (
                    f"{where}: top logprob ids {got_top} != oracle {finite}")
                assert [lp for _, lp in got_top] == pytest.approx(
                    [lp for _, lp in finite], abs=1e-4), where
            repeated |= token_id in generated
            seq.append_token(token_id)
    assert repeated, "no token was generated twice: the penalties were never exercised"
