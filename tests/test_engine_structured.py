"""Structured outputs in the engine: constrained rows follow their grammar, unconstrained rows in
the same batches stay token for token the reference's, and a constraint ends a choice exactly
when its grammar does (EOS only where the grammar may end; ``length`` inside an unfinished
structure)."""

from __future__ import annotations

import json
import re

import llguidance
import pytest
import torch
from engine_support import (
    CHARS,
    EosCharTokenizer,
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    prompt_of,
    request,
    tiny_checkpoint,
)

from model.checkpoint import Checkpoint
from model.generate import reference_steps
from service.engine.grammar import grammar_text, grammar_tokenizer
from service.engine.types import InvalidRequestError, StructuredOutputs

WORDS = StructuredOutputs("regex", r"[a-z]{2,6}( [a-z]{2,6}){1,3}\.")


def _text(tokens: list[int]) -> str:
    return "".join(CHARS[t] for t in tokens)


def _reference(checkpoint, req) -> list[int]:
    p = req.params
    return [s.token_id for s in reference_steps(
        checkpoint.model, list(req.prompt_token_ids), p.max_tokens, temperature=p.temperature,
        seed=p.seed, vocab_size=checkpoint.tokenizer.vocab_size)]


def _check_constrained_greedy(checkpoint, req, tokens: list[int]) -> None:
    """Greedy under the constraint, checked naively along the engine's own tokens: the whole
    cropped context through the model at each step, the allowed set from a fresh llguidance
    matcher (its own bitmask call, not the engine's step masks); each token must be allowed and
    the largest allowed logit up to rounding (the cached and the full forward may round apart,
    and the winner among a few allowed tokens can be close); the output ends when the grammar
    does, or at max_tokens."""
    tokenizer = grammar_tokenizer(checkpoint.tokenizer)
    so = req.params.structured
    matcher = llguidance.LLMatcher(tokenizer, grammar_text(so.kind, so.spec), log_level=0)
    context = list(req.prompt_token_ids)
    block, vocab = checkpoint.config.block_size, checkpoint.tokenizer.vocab_size
    for step, token in enumerate(tokens):
        with torch.no_grad():
            logits = checkpoint.model(torch.tensor([context[-block:]]))[0][0, -1, :vocab]
        bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        allowed = ((bits.unsqueeze(1) >> torch.arange(32)) & 1).flatten().bool()[:vocab]
        best = logits.masked_fill(~allowed, float("-inf")).max()
        assert allowed[token], f"{req.request_id} step {step}: token {token} is not allowed"
        assert logits[token] >= best - 1e-3 * (1 + best.abs()), (
            f"{req.request_id} step {step}: logit {float(logits[token]):.5f} < the best "
            f"allowed {float(best):.5f}")
        assert matcher.consume_token(token)
        context.append(token)
    assert matcher.is_stopped() or len(tokens) == req.params.max_tokens


def test_unconstrained_rows_match_the_reference_with_constrained_rows_mixed_in():
    ck = tiny_checkpoint()
    eng = engine(ck, max_batch_size=6, window_shift=1, prefill_chunk=16, max_tokens_per_step=32)
    plain = [request(f"p{i}", prompt_of(5 + 11 * i, i), max_tokens=40 + 5 * i,
                     temperature=0.0 if i % 2 else 1.0, seed=7 * i) for i in range(4)]
    constrained = [request(f"c{i}", prompt_of(9 + 7 * i, 50 + i), max_tokens=30,
                           temperature=0.0 if i % 2 else 0.9, seed=i, structured=WORDS)
                   for i in range(4)]
    reqs = [x for pair in zip(plain, constrained, strict=True) for x in pair]
    got = eng.generate(reqs, arrival_steps=[0, 0, 1, 2, 2, 5, 8, 8])
    for req, tokens in zip(reqs, got, strict=True):
        if req.params.structured is None:
            assert tokens == _reference(ck, req), f"{req.request_id}: a plain row was disturbed"
        else:
            assert re.fullmatch(WORDS.spec, _text(tokens)), \
                f"{req.request_id}: {_text(tokens)!r} does not match {WORDS.spec}"


def test_constrained_greedy_takes_the_best_allowed_token_past_the_window():
    ck = tiny_checkpoint(block_size=16)
    eng = engine(ck, max_batch_size=3, window_shift=1)
    long = StructuredOutputs("regex", r"([a-z]{3,5} ){3,5}[A-Z]+\.")
    reqs = [request(f"g{i}", prompt_of(10 + i, 90 + i), max_tokens=40, temperature=0.0,
                    structured=long) for i in range(3)]
    for req, tokens in zip(reqs, eng.generate(reqs), strict=True):
        _check_constrained_greedy(ck, req, tokens)


def _finishes(eng, reqs):
    events = eng.run(reqs)
    out = {}
    for rid, evs in events.items():
        for ev in evs:
            out.setdefault((rid, ev.index), []).append(ev)
    return {k: (_text([e.token_id for e in v if e.token_id is not None]), v[-1].finish_reason.value)
            for k, v in out.items()}


def test_a_complete_grammar_stops_and_an_unfinished_one_ends_with_length():
    eng = engine(tiny_checkpoint())
    done = _finishes(eng, [
        request("choice", "ab", max_tokens=50, temperature=1.0, seed=3,
                structured=StructuredOutputs("choice", json.dumps(["yes", "no way"]))),
        request("cut", "ab", max_tokens=4, temperature=0.0,
                structured=StructuredOutputs("regex", "[a-z]{10}")),
    ])
    assert done[("choice", 0)][0] in ("yes", "no way") and done[("choice", 0)][1] == "stop"
    assert done[("cut", 0)][1] == "length" and re.fullmatch("[a-z]{4}", done[("cut", 0)][0])


def test_eos_is_sampled_only_where_the_grammar_may_end():
    """EOS carries a +100 bias: unconstrained it would come first; constrained it is masked
    until two letters are in, and taken at once after."""
    base = tiny_checkpoint()
    ck = Checkpoint(base.model, EosCharTokenizer(CHARS), base.config, "gptserve", base.path, {})
    eng = engine(ck)
    eos = CHARS.index("\n")
    bias = {eos: 100.0}
    done = _finishes(eng, [
        request("free", "ab", max_tokens=5, temperature=0.0, logit_bias=bias),
        request("json", "ab", max_tokens=20, temperature=0.0, logit_bias=bias,
                structured=StructuredOutputs("regex", "[a-z]{2,8}")),
    ])
    assert done[("free", 0)] == ("\n", "stop")  # the end token, generated first
    text, reason = done[("json", 0)]
    assert reason == "stop" and len(text) == 3 and text[2] == "\n", (
        f"expected two letters then EOS, got {text!r}")


def test_n_seeds_and_logprobs_keep_working_under_a_constraint():
    eng = engine(tiny_checkpoint(), max_batch_size=8)
    req = request("n", "the ", max_tokens=30, temperature=1.2, seed=5, n=4, logprobs=2,
                  structured=WORDS)
    first = eng.run([req])["n"]
    again = engine(tiny_checkpoint(), max_batch_size=8).run([req])["n"]
    assert [e.token_id for e in first] == [e.token_id for e in again], "seeded: not reproducible"
    texts: dict[int, list[int]] = {}
    for ev in first:
        if ev.token_id is not None:
            texts.setdefault(ev.index, []).append(ev.token_id)
            assert ev.logprob is not None and ev.logprob > float("-inf")
            assert all(t.logprob > float("-inf") for t in ev.top_logprobs[:1])
    assert len(texts) == 4
    for tokens in texts.values():
        assert re.fullmatch(WORDS.spec, _text(tokens)), _text(tokens)


def test_a_repeated_constraint_compiles_once_and_the_cache_is_bounded():
    eng = engine(tiny_checkpoint(), grammar_cache=2)
    specs = [StructuredOutputs("regex", f"[a-z]{{{k}}}") for k in (1, 2, 3)]
    for _ in range(3):
        eng.grammars.compile(specs[0])
    assert eng.grammars.compiles == 1
    for s in specs:
        eng.grammars.compile(s)
    eng.grammars.compile(specs[0])  # evicted by the third: compiled again
    assert eng.grammars.compiles == 4


@pytest.mark.parametrize(("so", "needle"), [
    (StructuredOutputs("regex", "(ab", "guided_regex"), "not valid"),
    (StructuredOutputs("grammar", "root ::= (", "guided_grammar"), "not valid"),
    (StructuredOutputs("json", '{"type": "nonsense"}', "response_format"), "not valid"),
    (StructuredOutputs("json", '{"type": "object"}', "response_format"), "first token"),
    # only the end may come first: no output at all (the char vocabulary's end is virtual)
    (StructuredOutputs("regex", "", "guided_regex"), "first token"),
    (StructuredOutputs("regex", "x" * 70_000, "guided_regex"), "at most"),
])
def test_a_bad_or_impossible_constraint_is_refused_naming_its_field(so, needle):
    eng = engine(tiny_checkpoint())  # 70 characters: no "{"
    with pytest.raises(InvalidRequestError) as err:
        eng.validate(request("bad", "ab", structured=so))
    assert err.value.param == so.param and needle in err.value.message, err.value.message
