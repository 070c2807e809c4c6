"""Schemathesis fuzzes every operation of our OpenAPI document against a live server: never a 5xx.

The schema is loaded eagerly from the app factory's own document (``create_app(...).openapi()``,
which builds nothing: the checkpoint is only read by the lifespan), so collection needs no server
and the test uses schemathesis' plain ``@schema.parametrize()`` integration. Each generated case
is then sent over real HTTP to a uvicorn server on a loopback port, and one test checks that the
server publishes exactly the document that was fuzzed.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import live_server
from hypothesis import HealthCheck, settings

from service.app import create_app
from service.settings import Settings

schemathesis = pytest.importorskip("schemathesis")
MAX_TOKENS = 8  # generation length is capped so the fuzzing stays bounded in time

OPENAPI = create_app(Settings(checkpoint=Path("unused"))).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)
# Valid and invalid inputs both: invalid ones must get 4xx, never 5xx.
schema.config.generation.update(modes=list(schemathesis.GenerationMode))


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with live_server(tiny_checkpoint, max_batch_size=4, max_queue=64) as srv:
        yield srv


def test_the_server_publishes_the_fuzzed_document(server):
    published = httpx.get(server.url + "/openapi.json", timeout=30).json()
    assert published == OPENAPI, "the live /openapi.json differs from the document being fuzzed"


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@pytest.mark.timeout(120)
def test_no_operation_answers_with_a_server_error(case, server):
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):  # completions and chat
            if isinstance(body.get(key), int):
                body[key] = min(body[key], MAX_TOKENS)
        chat = case.path == "/v1/chat/completions"
        if chat and body.get("max_completion_tokens") is None and body.get("max_tokens") is None:
            body["max_tokens"] = MAX_TOKENS  # chat's default is a whole context window
    response = case.call(base_url=server.url, timeout=60)
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
