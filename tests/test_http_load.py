"""Under abuse the server stays clean: cut streams free their slots, overload gets clean 503s."""

from __future__ import annotations

import asyncio
import random
import socket

import httpx
import pytest
from conftest import live_server, wait_until

pytestmark = pytest.mark.timeout(180)


def _scrape(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _settled(server, idle_kv: float):
    def check() -> bool:
        m = _scrape(server.url)
        return (
            m["gptserve_num_requests_running"] == 0
            and m["gptserve_num_requests_waiting"] == 0
            and m["gptserve_kv_cache_usage_ratio"] == idle_kv
            and server.state.num_inflight_on(server.state.engine) == 0
        )

    return check


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    # 4 slots, room for the whole storm in the queue.
    with live_server(tiny_checkpoint, max_batch_size=4, max_queue=64) as srv:
        yield srv


def test_disconnect_storm_frees_every_slot_and_counts_each_disconnect(server):
    idle_kv = _scrape(server.url)["gptserve_kv_cache_usage_ratio"]
    before = _scrape(server.url)["gptserve_client_disconnects_total"]
    idle_tasks = server.num_tasks()
    rng = random.Random(1234)
    cuts = [rng.randint(0, 12) for _ in range(50)]  # events to read before hanging up

    async def one(client: httpx.AsyncClient, cut: int) -> None:
        body = {"prompt": "to be or not", "max_tokens": 5000, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            seen = 0
            async for _ in resp.aiter_lines():
                seen += 1
                if seen > cut:
                    break  # leaving the block closes the connection mid-stream

    async def storm() -> None:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            await asyncio.gather(*(one(client, c) for c in cuts))

    asyncio.run(storm())
    wait_until(_settled(server, idle_kv), what="gauges and KV usage back to idle")
    after = _scrape(server.url)
    assert after["gptserve_client_disconnects_total"] - before == 50
    wait_until(lambda: server.num_tasks() <= idle_tasks, what="request tasks to end")
    ok = httpx.post(
        server.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3}, timeout=30
    )
    assert ok.status_code == 200, "the server no longer serves after the storm"


@pytest.mark.parametrize("queued", [False, True], ids=["running", "queued"])
def test_non_streaming_disconnect_cancels_the_request(server, queued):
    idle_kv = _scrape(server.url)["gptserve_kv_cache_usage_ratio"]
    before = _scrape(server.url)
    blockers = []
    if queued:  # fill all 4 slots so the next request has to wait in the queue
        blockers = [_raw_request(server.port, stream=True) for _ in range(4)]
        wait_until(
            lambda: _scrape(server.url)["gptserve_num_requests_running"] == 4,
            what="4 running requests",
        )
    sock = _raw_request(server.port, stream=False)
    wait_until(lambda: server.state.num_inflight_on(server.state.engine) == len(blockers) + 1, what="request admitted")
    if queued:
        wait_until(
            lambda: _scrape(server.url)["gptserve_num_requests_waiting"] == 1,
            what="the request to wait in the queue",
        )
    sock.close()
    for other in blockers:
        other.close()
    wait_until(_settled(server, idle_kv), what="the cancelled request to leave the engine")
    after = _scrape(server.url)
    assert (
        after["gptserve_client_disconnects_total"] - before["gptserve_client_disconnects_total"]
        == len(blockers) + 1
    )
    aborted = 'gptserve_request_success_total{finish_reason="abort"}'
    assert after[aborted] - before[aborted] == len(blockers) + 1


def _raw_request(port: int, *, stream: bool, max_tokens: int = 10**6) -> socket.socket:
    flag = "true" if stream else "false"
    body = f'{{"prompt": "abc", "max_tokens": {max_tokens}, "stream": {flag}}}'.encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def test_a_full_server_answers_every_extra_request_with_a_clean_503(tiny_checkpoint):
    """Fill every slot and queue place with streams that cannot finish (a million tokens each,
    held open), observed through the gauges; then any extra request is refused, however fast or
    slow the engine is. Nothing races: the server is full before the extra requests are sent."""
    slots, queue, extra = 2, 4, 6
    with live_server(tiny_checkpoint, max_batch_size=slots, max_queue=queue) as srv:
        idle_kv = _scrape(srv.url)["gptserve_kv_cache_usage_ratio"]
        holders = []
        for held in range(1, slots + queue + 1):
            holders.append(_raw_request(srv.port, stream=True))
            wait_until(lambda n=held: _load(srv) == n, what=f"{held} requests in the engine")
        m = _scrape(srv.url)
        assert m["gptserve_num_requests_running"] == slots
        assert m["gptserve_num_requests_waiting"] == queue

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                body = {"prompt": "abc", "max_tokens": 5}
                return await asyncio.gather(
                    *(client.post("/v1/completions", json=body) for _ in range(extra))
                )

        rejected = asyncio.run(burst())
        for r in rejected:
            assert r.status_code == 503, (r.status_code, r.text)
            assert r.headers["Retry-After"].isdigit()
            assert r.json()["error"]["code"] == "queue_full"
        m = _scrape(srv.url)
        assert m['gptserve_request_rejected_total{reason="queue_full"}'] == extra
        assert _load(srv) == slots + queue, "a refused request disturbed the admitted ones"
        for sock in holders:
            sock.close()
        wait_until(_settled(srv, idle_kv), what="the held requests to leave the engine")
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 7},
                        timeout=60)
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 7


def _load(server) -> float:
    m = _scrape(server.url)
    return m["gptserve_num_requests_running"] + m["gptserve_num_requests_waiting"]


def test_request_timeout_cancels_the_request_with_a_clean_error(tiny_checkpoint):
    with live_server(tiny_checkpoint, request_timeout=0.5) as srv:
        idle_kv = _scrape(srv.url)["gptserve_kv_cache_usage_ratio"]
        body = {"prompt": "abc", "max_tokens": 10**6}
        resp = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "timeout"
        with httpx.stream(
            "POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert '"code":"timeout"' in events[-2] and events[-1] == "data: [DONE]"
        wait_until(_settled(srv, idle_kv), what="timed-out requests to leave the engine")
