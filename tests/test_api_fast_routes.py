"""The generation routes' short path (``service.api.fast_routes``): a body that validates goes
from its bytes to its handler past FastAPI's router; every answer is the one FastAPI's path gave.

The short path parses with pydantic-core (``model_validate_json``), FastAPI with ``json`` and
then pydantic in Python mode; the first test holds the two to the same reading of every body
both accept. The others run a real server: what only ``json`` reads still gets its old answer
(it falls back to FastAPI's path), and a handler's refusals and failures keep their envelopes."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from conftest import live_server

from service.api.chat_protocol import ChatCompletionRequest
from service.api.protocol import CompletionRequest

pytestmark = pytest.mark.timeout(120)

# bodies both parsers accept, chosen where JSON and Python values could part: ints for float
# fields, big ints, exponents, escapes, nested free-form objects, unknown fields, repeated keys
COMPLETION_BODIES = [
    b'{"prompt": "abc"}',
    b'{"prompt": "a", "temperature": 1, "top_p": 1E0, "min_p": 0.0, "max_tokens": 3}',
    b'{"prompt": "a", "temperature": 0.1, "presence_penalty": -0.0}',
    b'{"prompt": "a", "seed": 123456789012345678901234567890}',
    b'{"prompt": "a", "temperature": 123456789012345678901234567890}',
    b'{"prompt": "a", "temperature": 1.7976931348623157e308, "top_p": 5e-324}',
    b'{"prompt": "\\u00e9\\n\\t\\"\\\\ \\ud83d\\ude00 \\u0000"}',
    b'{"prompt": [1, 2, 3]}',
    b'{"prompt": [[1], [2, 3]]}',
    b'{"prompt": ["a", "b"], "stop": ["x", "y"], "n": 2, "best_of": 3}',
    b'{"prompt": "a", "stop": "x", "logprobs": 2, "echo": true}',
    b'{"prompt": "a", "logit_bias": {"5": 1, "6": -2.5}}',
    b'{"prompt": "a", "stream": true, "stream_options": {"include_usage": true}}',
    b'{"prompt": "a", "extra": {"x": [1, 2.5, null, true]}, "other": "y"}',
    b'{"prompt": "a", "prompt": "b"}',
    b'{"prompt": "a", "response_format": {"type": "json_schema", '
    b'"json_schema": {"schema": {"type": "object", "maximum": 1.5e3}}}}',
    b'{"prompt": "a", "structured_outputs": {"json": {"type": "integer"}}}',
    b'{"prompt": "a", "guided_json": "{}", "guided_choice": ["x", "y"]}',
    b' \n{"prompt": "a"}\n ',
]
CHAT_BODIES = [
    b'{"messages": [{"role": "user", "content": "hi"}]}',
    b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": '
    b'[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": "hi", "name": "x"}], "logprobs": true, '
    b'"top_logprobs": 2, "max_completion_tokens": 4, "temperature": 0}',
    b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
    b'"function": {"name": "f", "parameters": {"type": "object"}}}], "tool_choice": "auto"}',
]


@pytest.mark.parametrize(
    ("model", "body"),
    [(CompletionRequest, b) for b in COMPLETION_BODIES] + [(ChatCompletionRequest, b)
                                                            for b in CHAT_BODIES],
)
def test_the_short_paths_parse_reads_every_body_as_fastapis_does(model, body):
    fast = model.model_validate_json(body)
    slow = model.model_validate(json.loads(body))
    assert fast.model_dump() == slow.model_dump(), "a field reads differently"
    assert fast.model_extra == slow.model_extra, "the unknown fields read differently"
    assert [type(v) for v in fast.model_dump().values()] == [
        type(v) for v in slow.model_dump().values()
    ], "a field's value has another type"


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with live_server(tiny_checkpoint) as srv:
        yield srv


def _post(server, path: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=body, timeout=30,
                      headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b'{"prompt": "abc", "max_tokens": 3}'),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "ab"}], "max_tokens": 3}'),
    ],
    ids=["completions", "chat"],
)
def test_a_body_with_a_byte_order_mark_is_served_as_it_always_was(server, path, body):
    """``json`` skips a UTF-8 byte-order mark and pydantic-core refuses one: such a body must
    take FastAPI's path, not get a 400 from the short path."""
    resp = _post(server, path, b"\xef\xbb\xbf" + body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3, resp.json()


def test_a_refusal_on_the_short_path_has_its_envelope_and_is_counted(server):
    def rejected() -> float:
        for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith('gptserve_request_rejected_total{reason="invalid"}'):
                return float(line.rpartition(" ")[2])
        return 0.0

    before = rejected()
    unknown = _post(server, "/v1/completions", b'{"prompt": "a", "model": "gpt-5"}')
    too_many = _post(server, "/v1/chat/completions",
                     b'{"messages": [{"role": "user", "content": "a"}], "n": 1000}')
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"] == {
        "message": "model 'gpt-5' does not exist; this server serves 'tiny'",
        "type": "not_found_error", "param": "model", "code": "model_not_found"}
    assert too_many.status_code == 400, too_many.text
    assert too_many.json()["error"]["param"] == "n", too_many.json()
    assert rejected() - before == 2, "a refusal was not counted"


def test_an_unexpected_handler_error_is_a_500_envelope_logged_and_the_server_serves_on(
    tiny_checkpoint, caplog
):
    caplog.set_level(logging.INFO)
    body = b'{"prompt": "abc", "max_tokens": 2}'
    with live_server(tiny_checkpoint) as srv:
        engine = srv.state.engine
        real = engine.validate_size

        def broken(*args):
            raise RuntimeError("injected handler failure")

        engine.validate_size = broken
        try:
            failed = _post(srv, "/v1/completions", body)
        finally:
            engine.validate_size = real
        ok = _post(srv, "/v1/completions", body)
    assert failed.status_code == 500, failed.text
    assert failed.json()["error"]["code"] == "internal_error", failed.json()
    assert "injected handler failure" not in failed.text, "the error's text reached the client"
    assert any("injected handler failure" in r.getMessage() for r in caplog.records
               if r.levelno >= logging.ERROR), "the failure was not logged"
    statuses = [r.fields["status"] for r in caplog.records if r.name == "service.access"]
    assert 500 in statuses, f"the access log did not record the 500: {statuses}"
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text
