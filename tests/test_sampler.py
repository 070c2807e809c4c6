"""The engine's vectorised sampler: per-row parameters, penalties, padded vocab, invariance."""

from __future__ import annotations

import pytest
import torch

from model.sampling import logits_to_probs
from service.engine.sampler import Sampler
from service.engine.sequence import Sequence
from service.engine.types import Request, SamplingParams

V_MODEL, V_TOKENIZER = 12, 10  # ids 10 and 11 are embedding padding


def _seqs(sampler, *param_sets, prompt=(1, 2)):
    seqs = []
    for i, params in enumerate(param_sets):
        request = Request(f"r{i}", tuple(prompt), SamplingParams(**params))
        seq = Sequence(i, request, 0, 64, 1, seed=request.params.seed or 0)
        seq.admit(i)
        sampler.start(seq)
        seqs.append(seq)
    return seqs


def _sampler(n=4):
    return Sampler(n, V_MODEL, V_TOKENIZER, torch.device("cpu"))


def test_padded_vocab_is_never_sampled_even_when_it_has_the_largest_logit():
    sampler = _sampler()
    seqs = _seqs(sampler, dict(temperature=0.0), dict(temperature=5.0, seed=0))
    logits = torch.zeros(2, V_MODEL)
    logits[:, 10:] = 50.0
    for _ in range(50):
        tokens = sampler(logits.clone(), seqs).token_ids
        assert all(t < V_TOKENIZER for t in tokens)
        for seq, t in zip(seqs, tokens, strict=True):
            seq.append_token(t)  # the next draw uses the next counter


def test_logit_bias_and_greedy():
    sampler = _sampler()
    seqs = _seqs(sampler, dict(temperature=0.0, logit_bias=((7, 100.0),)), dict(temperature=0.0))
    logits = torch.arange(V_MODEL, dtype=torch.float32).repeat(2, 1) / 10
    out = sampler(logits, seqs)
    assert out.token_ids == [7, 9]


@pytest.mark.parametrize("params,expect", [
    (dict(presence_penalty=0.5), {3: 0.5}),  # once per generated token
    (dict(frequency_penalty=0.5), {3: 0.0}),  # per time generated: twice
    (dict(repetition_penalty=2.0), {1: 0.5, 2: 0.5, 3: 0.5}),  # prompt tokens 1, 2 and 3
])
def test_penalties_hit_only_the_tokens_they_should(params, expect):
    sampler = _sampler()
    [seq] = _seqs(sampler, dict(temperature=0.0, **params))
    sampler._counts[seq.slot, 3] = 2  # token 3 generated twice so far
    logits = torch.full((1, V_MODEL), 1.0)
    got = sampler._penalise(logits.clone(), torch.tensor([seq.slot]))
    changed = {i: float(got[0, i]) for i in range(V_MODEL) if got[0, i] != logits[0, i]}
    assert changed == expect, f"penalised logits {changed}, expected {expect}"


def test_filters_apply_per_row_and_leave_other_rows_bit_identical():
    torch.manual_seed(0)
    logits = torch.randn(1, 5000) * 3
    one = torch.ones(1)
    off = dict(top_k=torch.zeros(1, dtype=torch.long), top_p=one, min_p=torch.zeros(1))
    alone = logits_to_probs(logits, one, **off)
    both = logits_to_probs(
        logits.repeat(2, 1), torch.ones(2), torch.tensor([0, 3]), torch.tensor([1.0, 0.2]),
        torch.tensor([0.0, 0.5]), top_k_max=3,
    )
    assert torch.equal(both[0], alone[0]), "row 0 asked for no filter but was changed"
    assert int((both[1] > 0).sum()) <= 3


def test_seeded_rows_draw_the_same_tokens_in_any_batch_position():
    def run(order):
        sampler = _sampler()
        params = {"a": dict(temperature=1.0, seed=1), "b": dict(temperature=1.0, seed=2)}
        seqs = _seqs(sampler, *(params[k] for k in order))
        tokens = []
        for _ in range(30):
            step = sampler(torch.zeros(len(order), V_MODEL), seqs).token_ids
            for seq, token in zip(seqs, step, strict=True):
                seq.append_token(token)
            tokens.append(step)
        return {k: [step[i] for step in tokens] for i, k in enumerate(order)}

    ab, ba = run("ab"), run("ba")
    assert ab == ba and ab["a"] != ab["b"]


def test_plain_greedy_rows_pick_what_torch_argmax_picks_over_the_tokenizer_ids():
    # the all-greedy path reads the logits through NumPy on the CPU: the same first maximum on
    # ties, a NaN counted as the maximum, padding ids never chosen, bf16 logits read as float32
    sampler = _sampler()
    seqs = _seqs(sampler, *[dict(temperature=0.0)] * 4)
    logits = torch.randn(4, V_MODEL)
    logits[0, 10:] = 100.0  # padding holds the largest logit
    logits[1, [2, 5, 7]] = 50.0  # a tie: the first wins
    logits[2, [4, 8]] = float("nan")  # NaNs: the first NaN wins, as in torch
    logits[3] = float("-inf")  # nothing finite: id 0, as in torch
    want = logits[:, :V_TOKENIZER].argmax(dim=-1).tolist()
    assert want[:3] == [logits[0, :10].argmax().item(), 2, 4], want
    for dtype in (torch.float32, torch.bfloat16):
        got = sampler(logits.to(dtype), seqs).token_ids
        assert got == logits.to(dtype)[:, :V_TOKENIZER].float().argmax(dim=-1).tolist(), (
            f"{dtype}: {got}")
    assert sampler(logits, seqs).token_ids == want
    with torch.inference_mode():  # as the engine calls it
        assert sampler(logits.clone(), seqs).token_ids == want
    grad = logits.clone().requires_grad_()  # a caller outside no-grad: torch's own argmax
    assert sampler(grad, seqs).token_ids == want


def test_a_reused_slot_draws_what_a_fresh_sampler_draws_whatever_it_held_before():
    # a slot's parameter rows are written only when they change, and a greedy row's seed not at
    # all: slot 0 serves one request after another beside a sampled row in slot 1 (so every
    # step takes the per-row path, which reads each row's slot), against a fresh sampler each
    history = [dict(temperature=0.9, top_k=4, seed=3), dict(temperature=0.0),
               dict(temperature=0.0, repetition_penalty=1.5, presence_penalty=0.4),
               dict(temperature=0.0), dict(temperature=0.7, top_p=0.8, seed=9),
               dict(temperature=0.7, top_p=0.8, seed=11), dict(temperature=0.0, logprobs=1)]
    reused = _sampler()
    g = torch.Generator().manual_seed(0)
    for n, params in enumerate(history):
        fresh = _sampler()
        got, want = [], []
        for sampler, out in ((reused, got), (fresh, want)):
            seqs = []
            for slot, p in enumerate((params, dict(temperature=1.0, seed=5))):
                request = Request(f"r{n}-{slot}", (1, 2), SamplingParams(**p))
                seq = Sequence(slot, request, 0, 64, 1, seed=request.params.seed or 0)
                seq.admit(slot)
                sampler.start(seq)
                seqs.append(seq)
            state = g.get_state()
            for _ in range(4):
                sampled = sampler(torch.randn(2, V_MODEL, generator=g), seqs)
                out.append((sampled.token_ids, sampled.logprobs))
                for seq, t in zip(seqs, sampled.token_ids, strict=True):
                    seq.append_token(t)
            g.set_state(state)  # the same logits for the fresh sampler
            for seq in seqs:
                sampler.release(seq)
        assert got == want, f"request {n} ({params}) in a reused slot: {got} != {want}"
