"""The engine thread never dies silently, never holds shutdown, and bounds what it buffers."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from conftest import live_server, wait_until
from engine_support import (
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    request,
)

from service.engine import EngineStoppedError, FinishReason
from service.engine import engine as engine_module
from service.engine.stream import RequestStream
from service.engine.types import TokenEvents


def _collect_until_end(eng, *requests):
    async def main():
        streams = [eng.add_request(r) for r in requests]
        return await asyncio.gather(*([o async for o in s] for s in streams))

    return asyncio.run(main())


def test_an_error_outside_a_step_fails_every_request_and_the_engine_says_so():
    eng = engine(max_batch_size=1)
    real = eng._core.add_request
    calls = {"n": 0}

    def broken(req):  # the loop's bookkeeping, not a step: the old loop died silently here
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected bookkeeping failure")
        real(req)

    eng._core.add_request = broken
    eng.start()
    try:

        async def main():
            first = eng.add_request(request("a", "hello", max_tokens=10**6))
            await asyncio.sleep(0)
            second = eng.add_request(request("b", "hello", max_tokens=5))
            return [[o async for o in s] for s in (first, second)]

        first, second = asyncio.run(main())
        assert first[-1].finish_reason is FinishReason.ERROR
        assert second[-1].finish_reason is FinishReason.ERROR
        assert not eng.ready and "injected bookkeeping failure" in repr(eng.error)

        async def late():
            eng.add_request(request("c", "hello", max_tokens=1))

        with pytest.raises(EngineStoppedError, match="the engine failed"):
            asyncio.run(late())
    finally:
        eng.shutdown(timeout=1)


def test_a_failed_warm_up_is_reported_not_hidden():
    eng = engine()

    def boom():
        raise RuntimeError("no memory for the warm-up")

    eng._core.runner.warm_up = boom
    eng.start()
    wait_until(lambda: eng.error is not None, what="the engine to report its failure")
    assert not eng.ready and "no memory" in repr(eng.error)
    eng.shutdown(timeout=1)


def test_shutdown_returns_even_when_a_step_never_does(monkeypatch):
    monkeypatch.setattr(engine_module, "JOIN_GRACE", 0.5)
    eng = engine()
    stuck, release = threading.Event(), threading.Event()

    def hang():
        stuck.set()
        release.wait(60)
        raise RuntimeError("released")

    eng._core.step = hang
    eng.start()
    try:

        async def main():
            eng.add_request(request("a", "hi", max_tokens=3))
            await asyncio.to_thread(stuck.wait, 30)

        asyncio.run(main())
        t0 = time.monotonic()
        eng.shutdown(timeout=0.2)
        assert time.monotonic() - t0 < 10, "shutdown waited on a step that never returns"
    finally:
        release.set()


def test_a_stream_nobody_reads_is_cancelled_at_its_backlog_bound():
    aborted = []

    async def main():
        loop = asyncio.get_running_loop()
        stream = RequestStream("r", 1, loop, aborted.append, max_backlog=100)
        events = TokenEvents(["r"] * 60, [0] * 60, [7] * 60, [0] * 60, [False] * 60,
                             list(range(60)), cached_tokens=[0] * 60)
        stream.put(events)
        await asyncio.sleep(0)  # the loop runs the hand-over: 60 events wait unread
        stream.put(events)  # 120 > 100
        stream.put(events)
        return stream

    stream = asyncio.run(main())
    assert aborted == ["r"] and stream.overflowed, "the backlog bound did not cancel once"


def test_over_http_a_dead_engine_fails_ready_and_health_and_its_streams(tiny_checkpoint):
    with live_server(tiny_checkpoint, max_batch_size=2) as srv:
        eng = srv.state.engine
        real = eng._core.abort

        def broken(*args):
            raise RuntimeError("injected engine-thread failure")

        body = {"prompt": "ab", "max_tokens": 10**6, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            eng._core.abort = broken
            eng.abort(next(iter(eng._live)))  # the loop's abort handling now raises
            rest = [line for line in lines if line.startswith("data: ")]
        eng._core.abort = real
        assert '"finish_reason":"error"' in "".join(rest) or "engine" in "".join(rest), rest[-3:]
        ready = httpx.get(srv.url + "/ready", timeout=10)
        assert ready.status_code == 503 and "the engine failed" in ready.text
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        refused = httpx.post(srv.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 1},
                             timeout=10)
        assert refused.status_code == 503 and "the engine failed" in refused.text
