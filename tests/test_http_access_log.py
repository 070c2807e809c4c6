"""The access log's contract with handlers, on a real server: one line per request, with the
request id the client sees and whatever the handler reported on ``request.state.access``."""

from __future__ import annotations

import logging
import re

import httpx
import pytest
from conftest import live_server
from fastapi import Request

pytestmark = pytest.mark.timeout(60)


def _access_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "service.access"]


def test_the_access_line_carries_what_the_handler_reported(tiny_checkpoint, caplog):
    server = live_server(tiny_checkpoint)

    async def usage(request: Request) -> dict:
        record = request.state.access
        record.prompt_tokens, record.completion_tokens = 7, 3
        record.time_to_first_token = 0.25
        return {"request_id": record.request_id}

    server.app.add_api_route("/usage-probe", usage, methods=["POST"])
    caplog.set_level(logging.INFO, logger="service.access")
    with server:
        resp = httpx.post(f"{server.url}/usage-probe", json={}, timeout=30)
    assert resp.status_code == 200
    request_id = resp.headers["x-request-id"]
    assert resp.json() == {"request_id": request_id}, "the handler saw another id"
    (line,) = [r for r in _access_lines(caplog) if r.fields["request_id"] == request_id]
    assert line.fields | {"duration_s": None, "client": None} == {
        "request_id": request_id, "client": None, "method": "POST", "path": "/usage-probe",
        "status": 200, "prompt_tokens": 7, "completion_tokens": 3, "ttft_s": 0.25,
        "duration_s": None,
    }  # fmt: skip
    assert "prompt_tokens=7 completion_tokens=3 ttft_s=0.25" in line.getMessage()


def test_a_client_request_id_is_kept_only_when_it_is_safe_to_log(tiny_checkpoint, caplog):
    caplog.set_level(logging.DEBUG, logger="service.access")
    with live_server(tiny_checkpoint) as server:
        kept = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "lb-7f3a.2"})
        replaced = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "a b;" * 30})
        missing = httpx.get(f"{server.url}/nope")
    assert kept.headers["x-request-id"] == "lb-7f3a.2"
    for resp in (replaced, missing):
        assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"]), resp.headers
    lines = {r.fields["request_id"]: r for r in _access_lines(caplog)}
    assert lines["lb-7f3a.2"].levelno == logging.DEBUG, "probes are logged at debug level"
    assert lines[missing.headers["x-request-id"]].fields["status"] == 404
    assert lines[missing.headers["x-request-id"]].levelno == logging.INFO
