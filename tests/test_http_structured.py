"""Structured outputs over HTTP on a byte-level BPE model (GPT-2's tokenizer, random weights: the
constraint alone makes the output valid), through the openai client and LangChain.

Every schema of ``tests/structured_schemas.py`` runs greedy on chat (``response_format``) and
seeded-sampled on completions (vLLM's ``structured_outputs``, streamed; ``guided_json`` with
n=2), all at once and beside unconstrained requests, and every output must parse, validate
against its schema (``jsonschema``) and end with ``stop``.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from conftest import live_server, save_tiny_bpe_checkpoint
from structured_schemas import MAX_TOKENS, SCHEMAS

pytestmark = pytest.mark.timeout(300)
HI = [{"role": "user", "content": "Tell me."}]
TOOL_SCHEMA = SCHEMAS["tool_arguments"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": TOOL_SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": SCHEMAS["enum_string"]},
             "required": ["zone"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_tiny_bpe_checkpoint(tmp_path_factory.mktemp("bpe") / "bpe", block_size=64)
    with live_server(path, max_batch_size=16, max_queue=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _valid(text: str, schema: dict, where: str) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise AssertionError(f"{where}: not JSON ({err}): {text!r}") from None
    try:
        jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    except jsonschema.ValidationError as err:
        raise AssertionError(f"{where}: {text!r} breaks the schema: {err.message}") from None


def _chat_greedy(client, name, schema):
    r = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": name, "schema": schema, "strict": True}})
    return [(r.choices[0].message.content, r.choices[0].finish_reason)]


def _completion_streamed(client, name, schema):
    text, reason = "", None
    for chunk in client.completions.create(
            model="tiny", prompt=f"{name}:", max_tokens=MAX_TOKENS, temperature=1.0,
            seed=len(name), stream=True, extra_body={"structured_outputs": {"json": schema}}):
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
    return [(text, reason)]


def _completion_n2(client, name, schema):
    r = client.completions.create(model="tiny", prompt="{", max_tokens=MAX_TOKENS,
                                  temperature=0.9, top_p=0.9, seed=1, n=2,
                                  extra_body={"guided_json": json.dumps(schema)})
    return [(c.text, c.finish_reason) for c in r.choices]


def _plain(client, i):
    return client.completions.create(model="tiny", prompt="Once", max_tokens=24,
                                     temperature=1.0, seed=i).choices[0].text


def test_every_schema_validates_greedy_and_sampled_streamed_and_not_beside_plain_rows(client):
    ways = (_chat_greedy, _completion_streamed, _completion_n2)
    with ThreadPoolExecutor(12) as pool:
        plain = [pool.submit(_plain, client, i) for i in range(6)]
        runs = {(name, way.__name__): pool.submit(way, client, name, schema)
                for name, schema in SCHEMAS.items() for way in ways}
        for (name, how), future in runs.items():
            for text, reason in future.result():
                _valid(text, SCHEMAS[name], f"{name} ({how})")
                assert reason == "stop", f"{name} ({how}): a bounded schema ended with {reason}"
        assert all(len(f.result()) > 0 for f in plain)


def test_regex_choice_and_grammars_hold_on_bpe(client):
    cases = {
        "regex": ({"structured_outputs": {"regex": r"[a-z]{2,6}@[a-z]{3}\.(com|org)"}},
                  r"[a-z]{2,6}@[a-z]{3}\.(com|org)"),
        "guided_regex": ({"guided_regex": r"\d{3}-\d{4}"}, r"\d{3}-\d{4}"),
        "choice": ({"structured_outputs": {"choice": ["alpha", "beta gamma"]}},
                   r"alpha|beta gamma"),
        "gbnf": ({"guided_grammar": 'root ::= "(" [0-9] [0-9]? ("+" [0-9])? ")"'},
                 r"\([0-9][0-9]?(\+[0-9])?\)"),
        "lark": ({"structured_outputs": {"grammar": 'start: "ab" C C? C?\nC: /[xy]/'}},
                 r"ab[xy]{1,3}"),
    }
    for name, (extra, pattern) in cases.items():
        r = client.completions.create(model="tiny", prompt="x", max_tokens=40, temperature=1.0,
                                      seed=4, n=2, extra_body=extra)
        for c in r.choices:
            assert re.fullmatch(pattern, c.text), f"{name}: {c.text!r} !~ {pattern}"


def test_json_object_mode_is_a_json_object_or_cut_by_length(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert text.startswith("{"), text
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert reason == "length"


def test_max_tokens_inside_an_unfinished_structure_ends_with_length(client):
    r = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=3, temperature=0,
        response_format={"type": "json_schema", "json_schema": {
            "name": "nested", "schema": SCHEMAS["nested_object"]}})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith('{"')


def test_stop_strings_best_of_and_logprobs_work_with_a_constraint(client):
    r = client.completions.create(model="tiny", prompt="x", max_tokens=40, temperature=1.0,
                                  seed=9, n=2, best_of=3, logprobs=2,
                                  extra_body={"structured_outputs": {"regex": "(ab|cd){4}zz"}})
    for c in r.choices:
        assert re.fullmatch("(ab|cd){4}zz", c.text) and c.finish_reason == "stop"
        assert all(lp is not None and lp > float("-inf") for lp in c.logprobs.token_logprobs)
    r = client.completions.create(model="tiny", prompt="x", max_tokens=40, temperature=0,
                                  stop=["cd"], extra_body={"guided_regex": "ab(cd)+ef"})
    assert r.choices[0].text == "ab" and r.choices[0].finish_reason == "stop"


def test_a_named_tool_choice_returns_a_tool_call_whose_arguments_validate(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=MAX_TOKENS,
                                       temperature=0.8, seed=2, tools=TOOLS, tool_choice=choice)
    message = r.choices[0].message
    assert message.content is None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    _valid(call.function.arguments, TOOL_SCHEMA, "tool arguments")
    # streamed: the id and name first, then the arguments in pieces
    deltas = [c.choices[0].delta for c in client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=MAX_TOKENS, temperature=0.8, seed=2,
        tools=TOOLS, tool_choice=choice, stream=True) if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert "".join(c.function.arguments or "" for c in calls) == call.function.arguments


def test_tool_choice_required_returns_calls_among_the_tools(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=200,
                                       temperature=0.7, seed=3, tools=TOOLS,
                                       tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert calls, "required: at least one call"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        _valid(call.function.arguments, schemas[call.function.name], call.function.name)


def test_langchain_structured_output_and_forced_tools_work_against_the_server(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """Weather for a place."""

        location: str = Field(max_length=8)
        unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny",
                     temperature=0, max_tokens=MAX_TOKENS, max_retries=0)
    for method in ("json_schema", "function_calling"):
        got = llm.with_structured_output(Weather, method=method).invoke("Weather?")
        assert isinstance(got, Weather) and got.unit in ("celsius", "fahrenheit"), method
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"
    Weather.model_validate(message.tool_calls[0]["args"])


BAD = [
    ("schema_invalid", "/v1/chat/completions", {"response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "not valid"),
    ("keyword_unsupported", "/v1/completions", {"structured_outputs": {"json": {
        "type": "string", "format": "no-such-format"}}}, "structured_outputs", "not valid"),
    ("regex_broken", "/v1/completions", {"guided_regex": "(ab"}, "guided_regex", "not valid"),
    ("grammar_syntax", "/v1/completions", {"guided_grammar": "root ::= ("}, "guided_grammar",
     "not valid"),
    ("schema_not_json", "/v1/completions", {"guided_json": "{nope"}, "guided_json",
     "not valid JSON"),
    ("two_constraints", "/v1/completions", {"guided_regex": "a", "guided_choice": ["b"]},
     "guided_choice", "only one"),
    ("empty_structured", "/v1/completions", {"structured_outputs": {}}, "structured_outputs",
     "exactly one"),
    ("structural_tag", "/v1/completions", {"structured_outputs": {
        "regex": "a", "structural_tag": "{}"}}, "structured_outputs", "not supported"),
    ("format_type", "/v1/chat/completions", {"response_format": {"type": "yaml"}},
     "response_format", "not supported"),
    ("too_big", "/v1/completions", {"guided_regex": "a" * 70_000}, "guided_regex", "at most"),
    ("auto_tools", "/v1/chat/completions", {"tools": TOOLS}, "tool_choice", "auto"),
    ("unknown_tool", "/v1/chat/completions", {"tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among"),
    ("malformed_tool", "/v1/chat/completions", {"tools": [{"type": "function"}],
                                                "tool_choice": "required"}, "tools", "tools[0]"),
    ("tools_and_format", "/v1/chat/completions", {
        "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "tool_choice"),
]


@pytest.mark.parametrize(("case", "path", "extra", "param", "needle"), BAD,
                         ids=[b[0] for b in BAD])
def test_a_bad_constraint_is_a_400_naming_the_field_and_the_server_keeps_serving(
        server, case, path, extra, param, needle):
    body = {"max_tokens": 4, **extra}
    body |= {"messages": HI} if "chat" in path else {"prompt": "x"}
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, f"{case}: {r.status_code} {r.text[:300]}"
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], f"{case}: {error}"
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200
