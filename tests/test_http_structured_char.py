"""Structured outputs on the shipped char model (65 characters: no ``{ } [ ] "`` and no digit but
3): the regexes, choices and schemas it can express hold, over HTTP and offline, beside
unconstrained requests; a schema it cannot express at all is a 400 naming the field; a
constraint that outlasts ``--grammar-timeout`` to compile is a 400 too."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import live_server

from service.engine.types import InvalidRequestError

pytestmark = pytest.mark.timeout(300)
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "shakespeare-char"
HI = [{"role": "user", "content": "Speak."}]
REPLY = r"(Ay|No), my (lord|liege)[.!]"
WORD = r"[A-Z][a-z]{2,7}( [a-z]{2,7}){0,3}[.?!]"
SCHEMAS = {"boolean": {"type": "boolean"},
           "small_integer": {"type": "integer", "minimum": 0, "maximum": 40},
           "boolean_or_null": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}


@pytest.fixture(scope="module")
def server():
    with live_server(SHIPPED, model_name="shakespeare-char", max_batch_size=16) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _completions(client, extra, stream, n=1, seed=0):
    if not stream:
        r = client.completions.create(model="shakespeare-char", prompt="ROMEO:", max_tokens=40,
                                      temperature=0.9, seed=seed, n=n, extra_body=extra)
        return [(c.text, c.finish_reason) for c in r.choices]
    texts, reasons = [""] * n, [None] * n
    for chunk in client.completions.create(model="shakespeare-char", prompt="ROMEO:",
                                           max_tokens=40, temperature=0.9, seed=seed, n=n,
                                           stream=True, extra_body=extra):
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    return list(zip(texts, reasons, strict=True))


def test_regexes_choices_and_expressible_schemas_hold_streamed_and_not_beside_plain_rows(client):
    runs = {}
    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(_completions, client, {}, i % 2 == 0, 1, i) for i in range(4)]
        for stream in (False, True):
            runs["regex", stream] = pool.submit(_completions, client, {
                "structured_outputs": {"regex": REPLY}}, stream, 3, 1)
            runs["guided_regex", stream] = pool.submit(_completions, client, {
                "guided_regex": WORD}, stream, 2, 2)
            runs["choice", stream] = pool.submit(_completions, client, {
                "guided_choice": ["To be", "not to be"]}, stream, 2, 3)
            for name, schema in SCHEMAS.items():
                runs[name, stream] = pool.submit(_completions, client, {
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": name, "schema": schema}}}, stream, 2, 4)
        for (name, stream), future in runs.items():
            for text, reason in future.result():
                where = f"{name} (stream={stream})"
                assert reason == "stop", f"{where}: {text!r} ended with {reason}"
                if name in SCHEMAS:
                    jsonschema.validate(json.loads(text), SCHEMAS[name])
                else:
                    pattern = {"regex": REPLY, "guided_regex": WORD,
                               "choice": "To be|not to be"}[name]
                    assert re.fullmatch(pattern, text), f"{where}: {text!r} !~ {pattern}"
        assert all(len(text) == 40 for f in plain for text, _ in f.result())


def test_chat_takes_the_same_constraints(client):
    r = client.chat.completions.create(model="shakespeare-char", messages=HI, max_tokens=30,
                                       temperature=0, extra_body={"guided_regex": REPLY})
    assert re.fullmatch(REPLY, r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("schema", [{"type": "object"}, {"type": "string"},
                                    {"type": "array", "items": {"type": "boolean"}},
                                    {"enum": ["yes", "no"]}])
def test_a_schema_this_vocabulary_cannot_express_is_a_400_naming_the_field(server, schema):
    for path, body in (("/v1/chat/completions", {"messages": HI}),
                       ("/v1/completions", {"prompt": "ROMEO:"})):
        r = httpx.post(server.url + path, json={**body, "max_tokens": 5, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "response_format" and "first token is impossible" in \
            error["message"], error


def test_the_offline_llm_takes_the_same_constraints():
    from service import LLM, SamplingParams, structured_outputs

    llm = LLM(SHIPPED, device="cpu", max_batch_size=4)
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=0, n=2,
                            structured=structured_outputs(regex=REPLY))
    plain = SamplingParams(max_tokens=12, temperature=0)
    constrained, free = llm.generate(["ROMEO:", "JULIET:"], params)[0], \
        llm.generate(["JULIET:"], plain)[0]
    for out in constrained.outputs:
        assert re.fullmatch(REPLY, out.text) and out.finish_reason == "stop", out.text
    assert len(free.outputs[0].text) == 12
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(["ROMEO:"], SamplingParams(structured=structured_outputs(json={
            "type": "object"})))
    assert err.value.param == "structured_outputs"


def test_a_constraint_slower_to_compile_than_the_limit_is_a_400(tiny_checkpoint):
    # 9,000 alternatives: tens of milliseconds to compile, against a limit of a microsecond
    slow = "(" + "|".join(f"w{'ab'[i % 2]}{i:x}" for i in range(9000)).translate(
        str.maketrans("0123456789", "ghijklmnop")) + ")+"
    with live_server(tiny_checkpoint, grammar_timeout=1e-6) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={
            "prompt": "ab", "max_tokens": 4, "guided_regex": slow}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "guided_regex" and "longer than" in error["message"], error
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2},
                        timeout=60)
        assert ok.status_code == 200
