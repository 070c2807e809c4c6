"""Schemathesis fuzzes every operation in /openapi.json against a live server: never a 5xx."""

from __future__ import annotations

import pytest
from conftest import live_server
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")
MAX_TOKENS = 32  # generation length is capped so the fuzzing stays bounded in time


@pytest.fixture(scope="module")
def api_schema(tiny_checkpoint):
    with live_server(tiny_checkpoint, max_batch_size=4, max_queue=64) as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        # Valid and invalid inputs both: invalid ones must get 4xx, never 5xx.
        schema.config.generation.update(modes=list(schemathesis.GenerationMode))
        yield schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@pytest.mark.timeout(120)
def test_no_operation_answers_with_a_server_error(case):
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], MAX_TOKENS)
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
