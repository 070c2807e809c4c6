"""CORS answers only the configured origins and never pairs a wildcard with credentials."""

from __future__ import annotations

import httpx
import pytest
from conftest import live_server

pytestmark = pytest.mark.timeout(120)
GOOD, EVIL = "http://good.test", "http://evil.test"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with live_server(tiny_checkpoint, cors_origins=(GOOD,), api_key="k") as srv:
        yield srv


def test_configured_origin_may_call_the_api_with_its_bearer_key(server):
    pre = httpx.options(server.url + "/v1/completions", headers={"Origin": GOOD, **PREFLIGHT})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == GOOD
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in pre.headers
    resp = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "ab", "max_tokens": 2},
        headers={"Origin": GOOD, "Authorization": "Bearer k"},
        timeout=30,
    )
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == GOOD


def test_other_origins_get_no_cors_grant(server):
    pre = httpx.options(server.url + "/v1/completions", headers={"Origin": EVIL, **PREFLIGHT})
    assert pre.status_code == 400
    assert "access-control-allow-origin" not in pre.headers
    resp = httpx.get(server.url + "/health", headers={"Origin": EVIL})
    assert "access-control-allow-origin" not in resp.headers


def test_wildcard_origin_never_comes_with_credentials(tiny_checkpoint):
    with live_server(tiny_checkpoint, cors_origins=("*",)) as srv:
        pre = httpx.options(srv.url + "/v1/completions", headers={"Origin": EVIL, **PREFLIGHT})
        assert pre.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in pre.headers


def test_no_origins_configured_means_no_cors_headers(tiny_checkpoint):
    with live_server(tiny_checkpoint) as srv:
        resp = httpx.get(srv.url + "/health", headers={"Origin": GOOD})
        assert "access-control-allow-origin" not in resp.headers
