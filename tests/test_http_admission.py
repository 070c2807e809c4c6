"""Admission counts sequences, refuses what can never fit, is fair, and frees slots at once."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import live_server, wait_until

pytestmark = pytest.mark.timeout(180)


def _stats(server):
    return server.state.engine.stats()


def _live(server) -> int:
    stats = _stats(server)
    return stats.num_running + stats.num_waiting


def test_one_request_cannot_put_thousands_of_sequences_in_the_queue(tiny_checkpoint):
    with live_server(tiny_checkpoint, max_batch_size=4, max_queue=64) as srv:
        body = {"prompt": ["a"] * 255, "n": 16, "max_tokens": 1_000_000}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "n" and "4080 sequences" in error["message"], error
        assert "Retry-After" not in r.headers
        assert _live(srv) == 0, "a refused request left sequences in the engine"


def test_a_request_larger_than_the_whole_queue_is_a_400_even_on_an_idle_server(tiny_checkpoint):
    with live_server(tiny_checkpoint, max_batch_size=2, max_queue=4,
                     max_request_sequences=64) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": ["ab"] * 7, "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 400 and "Retry-After" not in r.headers, r.text
        assert "at most 6" in r.json()["error"]["message"]
        # nothing of it stayed behind: a request that fits is served at once
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": ["ab"] * 6, "max_tokens": 2},
                        timeout=60)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 6


def test_a_simultaneous_burst_is_admitted_like_the_same_requests_staggered(tiny_checkpoint):
    slots, queue = 2, 4
    with live_server(tiny_checkpoint, max_batch_size=slots, max_queue=queue) as srv:

        all_in = asyncio.Event()  # seen once: the first holder to see it must not leave alone

        async def hold(client: httpx.AsyncClient) -> int:
            body = {"prompt": "ab", "max_tokens": 1_000_000, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code == 200:  # admitted: hold the stream until all are in
                    await asyncio.to_thread(
                        wait_until, lambda: all_in.is_set() or _live(srv) == slots + queue)
                    all_in.set()
                return resp.status_code

        async def burst() -> list[int]:
            limits = httpx.Limits(max_connections=slots + queue + 1)
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as client:
                return await asyncio.gather(*(hold(client) for _ in range(slots + queue)))

        assert asyncio.run(burst()) == [200] * (slots + queue)
        wait_until(lambda: _live(srv) == 0, what="the held streams to leave")


def test_a_choice_ended_by_a_stop_string_frees_its_slot_while_its_sibling_runs(tiny_checkpoint):
    with live_server(tiny_checkpoint, max_batch_size=4) as srv:
        probe = {"prompt": "ab", "n": 2, "seed": 3, "temperature": 1.0, "max_tokens": 12}
        first = httpx.post(srv.url + "/v1/completions", json=probe, timeout=60).json()
        # choice 0's first 10 characters: it stops there, and its sibling (its own derived seed) would
        # have to write the same 10 random characters to stop too, about 65**-10 per position
        stop = first["choices"][0]["text"][:10]
        assert len(stop) == 10 and stop != first["choices"][1]["text"][:10]
        body = {**probe, "max_tokens": 1_000_000, "stop": [stop], "stream": True}
        stopped, freed = None, None
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
            for n, line in enumerate(resp.iter_lines()):
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice["index"] == 0 and choice["finish_reason"] == "stop":
                    stopped = n
                elif stopped is not None and choice["index"] == 1:
                    # choice 1 streams on (a million tokens): within a few of its events the
                    # engine must be down to one running sequence
                    if _stats(srv).num_running == 1:
                        freed = n
                        break
                    assert n - stopped < 200, "choice 0 still holds its slot 200 events later"
        assert stopped is not None and freed is not None
        wait_until(lambda: _live(srv) == 0, what="closing the stream to abort choice 1")
