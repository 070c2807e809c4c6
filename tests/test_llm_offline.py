"""The offline batch API: the server's engine and text path in the caller's thread."""

from __future__ import annotations

import hashlib

import pytest
from conftest import live_server
from openai import OpenAI

from model import load_checkpoint
from model.tokenizer import TokenizerError
from service import LLM, SamplingParams
from service.engine import InvalidRequestError

PROMPTS = ["to be or", "what light"]


def test_offline_results_equal_the_server_s_for_the_same_request(tiny_checkpoint):
    knobs = dict(max_batch_size=4, batch_invariant=True, device="cpu")
    body = dict(prompt=PROMPTS, n=2, seed=5, temperature=0.9, max_tokens=40, stop=["e", "a"])
    with live_server(tiny_checkpoint, **knobs) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused")
        over_http = client.completions.create(model="tiny", **body).choices
    llm = LLM(tiny_checkpoint, **knobs)
    offline = llm.generate(PROMPTS, SamplingParams(n=2, seed=5, temperature=0.9, max_tokens=40),
                           stop=["e", "a"])
    got = [(o.text, o.finish_reason) for r in offline for o in r.outputs]
    want = [(c.text, c.finish_reason) for c in sorted(over_http, key=lambda c: c.index)]
    assert got == want
    assert any(reason == "stop" for _, reason in got), "no stop string was hit: weak test"


def test_offline_greedy_equals_the_reference_generator(tiny_checkpoint):
    from model import reference_generate

    ck = load_checkpoint(tiny_checkpoint)
    llm = LLM(ck, device="cpu", window_shift=1)
    [result] = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=70, temperature=0.0))
    want = reference_generate(ck.model, [1, 2, 3], 70, temperature=0.0)
    assert list(result.outputs[0].token_ids) == want  # past the 32-token window


def test_a_batch_job_larger_than_the_server_queue_is_served_whole(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, max_batch_size=4, max_queue=8, device="cpu")
    prompts = ["line " + "abcdefghij"[i % 10] * (1 + i // 10) for i in range(60)]
    results = llm.generate(prompts, SamplingParams(max_tokens=5))
    assert len(results) == 60
    assert all(r.outputs[0].finish_reason == "length" for r in results)
    assert [r.prompt for r in results] == prompts


def test_logprobs_add_up_to_the_cumulative_logprob(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu")
    [result] = llm.generate("abc", SamplingParams(max_tokens=12, seed=1, logprobs=2))
    out = result.outputs[0]
    assert len(out.logprobs) == 12 and all(len(e.top) == 2 for e in out.logprobs)
    assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs))


def test_bad_prompts_are_refused_with_the_api_s_errors(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu")
    with pytest.raises(InvalidRequestError):
        llm.generate([[]])
    with pytest.raises(TokenizerError):
        llm.generate(["\ud800"])
    with pytest.raises(InvalidRequestError) as err:
        llm.generate("ab", SamplingParams(max_tokens=0))
    assert err.value.param == "max_tokens"


def test_offline_choices_of_nearby_seeds_differ_and_replay_alone(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu")

    def texts(seed, n):
        [result] = llm.generate("to be", SamplingParams(n=n, seed=seed, temperature=1.0,
                                                        max_tokens=16))
        return [o.text for o in result.outputs]

    one, two = texts(1, 3), texts(2, 3)
    assert not set(one) & set(two), f"seed=1 and seed=2 share choices: {one} {two}"
    derived = [1] + [int.from_bytes(hashlib.blake2b(f"1:{j}".encode(), digest_size=8).digest(),
                                    "big") >> 1 for j in (1, 2)]  # docs/API.md's derivation
    assert [texts(seed, 1)[0] for seed in derived] == one


def test_a_stop_string_is_one_stop_string_not_its_characters(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu")
    seeded = SamplingParams(max_tokens=60, temperature=1.0, seed=3)
    [free] = llm.generate("to be or", seeded)
    text = free.outputs[0].text
    # a three-character piece whose characters all occur earlier on their own
    at = next(
        i for i in range(1, len(text) - 2)
        if text.find(text[i : i + 3]) == i and all(c in text[:i] for c in text[i : i + 3])
    )
    stop = text[at : at + 3]
    for given in (stop, [stop]):
        [result] = llm.generate("to be or", seeded, stop=given)
        out = result.outputs[0]
        assert (out.text, out.finish_reason) == (text[:at], "stop"), (
            f"stop={given!r} did not end the text at its first occurrence"
        )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 9}, "logprobs"),
        ({"seed": -1}, "seed"),
        ({"logit_bias": {1: 500.0}}, "logit_bias"),
    ],
)
def test_sampling_params_are_validated_when_built(fields, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.create(**fields)
    assert err.value.param == param
    if "logit_bias" not in fields:
        with pytest.raises(InvalidRequestError):
            SamplingParams(**fields)


def test_a_stop_that_is_not_text_is_refused(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu")
    for bad in ([""], [3], "", b"xy"):
        with pytest.raises(InvalidRequestError) as err:
            llm.generate("ab", SamplingParams(max_tokens=2), stop=bad)
        assert err.value.param == "stop"


def test_the_offline_api_imports_nothing_of_the_http_layer():
    import subprocess
    import sys

    code = ("import sys, service.llm; "
            "print(sorted(m for m in sys.modules if m.startswith(('service.api', 'fastapi'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"service.llm pulls in the HTTP layer: {out.stdout}"
