"""The SSE response (``service.api.sse.EventStreamResponse``) on a real server: its events skip
the middlewares' ``send`` wrappers, so what those middlewares add to a response's start and
record at its end must still be there on a stream (request id, CORS, access log, API key)."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from conftest import live_server

pytestmark = pytest.mark.timeout(60)
ORIGIN = "https://app.example"


def test_a_stream_keeps_every_middlewares_headers_and_its_access_line(tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="service.access")
    body = {"prompt": "ab", "max_tokens": 12, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": "Bearer k", "Origin": ORIGIN, "X-Request-Id": "sse-1"}
    with live_server(tiny_checkpoint, api_key="k", cors_origins=(ORIGIN,)) as server:
        resp = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30)
        refused = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == "sse-1", "the access log's header is missing"
    assert resp.headers["access-control-allow-origin"] == ORIGIN, "CORS's header is missing"
    assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
    assert resp.headers["cache-control"] == "no-cache", resp.headers
    assert refused.status_code == 401, "the key is no longer checked on streams"
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 12 and text, chunks[-1]
    (line,) = [r for r in caplog.records
               if r.name == "service.access" and r.fields["request_id"] == "sse-1"]
    assert line.fields["status"] == 200, line.fields
    assert line.fields["completion_tokens"] == 12, line.fields
    assert line.fields["ttft_s"] is not None, "the stream's first token time was not reported"


def test_a_streams_tokens_and_text_are_the_unstreamed_answers(tiny_checkpoint):
    """Read as it comes (a read of one row at a time, mostly): every token once, same text."""
    body = {"prompt": "ab", "max_tokens": 20, "stream": True, "temperature": 0, "logprobs": 0}
    with live_server(tiny_checkpoint) as server:
        plain = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False},
                           timeout=30).json()["choices"][0]["text"]
        chunks = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:])["choices"][0])
    tokens = [len(c["logprobs"]["tokens"]) for c in chunks]
    assert sum(tokens) == 20, f"tokens were lost or repeated: {tokens}"
    assert "".join(c["text"] for c in chunks) == plain, "the stream's text differs"
    assert chunks[-1]["finish_reason"] == "length", chunks[-1]
