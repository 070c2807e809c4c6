"""The threaded facade, driven from asyncio as the HTTP layer drives it."""

from __future__ import annotations

import asyncio

import pytest
from engine_support import (
    engine,
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    prompt_of,
    request,
    tiny_checkpoint,
)

from service.engine import (
    EngineStoppedError,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
)

pytestmark = pytest.mark.timeout(60)


async def _collect(stream):
    return [out async for out in stream]


def test_concurrent_streams_match_the_synchronous_engine():
    ck = tiny_checkpoint()
    reqs = [request(f"r{i}", prompt_of(4 + 5 * i, i), max_tokens=12 + i, seed=i, n=1 + i % 2)
            for i in range(6)]
    # invariant steps: the thread batches requests as they arrive, the synchronous run does not
    want = engine(ck, max_batch_size=4, batch_invariant=True).generate(reqs)
    eng = engine(ck, max_batch_size=4, batch_invariant=True)
    seen = []
    eng.add_stats_listener(seen.append)
    eng.start()
    ready = []

    async def main():
        streams = [eng.add_request(r) for r in reqs]
        results = await asyncio.gather(*(_collect(s) for s in streams))
        ready.append(eng.ready)
        return results

    try:
        results = asyncio.run(main())
    finally:
        eng.shutdown(timeout=5)
    got = []
    for req, events in zip(reqs, results, strict=True):
        assert sum(e.finish_reason is not None for e in events) == req.params.n
        for i in range(req.params.n):
            got.append([e.token_id for e in events if e.index == i])
    assert got == want, "the threaded engine differs from the synchronous one"
    assert ready == [True] and not eng.ready, "ready while serving, not after shutdown"
    assert seen and seen[-1].total_steps >= 12
    assert eng.stats().num_running == 0 and eng.stats().kv_cache_usage == 0.0


def test_abort_from_the_stream_ends_it_with_an_abort_event_and_idle_stats():
    eng = engine(max_batch_size=2)
    seen = []
    eng.add_stats_listener(seen.append)
    eng.start()

    async def main():
        stream = eng.add_request(request("a", "hello", max_tokens=100_000, temperature=1.0))
        events = []
        async for out in stream:
            events.append(out)
            if len(events) == 3:
                stream.abort()
        return events

    try:
        events = asyncio.run(main())
    finally:
        eng.shutdown()
    assert events[-1].finish_reason is FinishReason.ABORT
    assert all(e.finish_reason is None for e in events[:-1]) and len(events) < 1000
    assert seen[-1].num_running == 0 and seen[-1].kv_cache_usage == 0.0, "stale load gauges"


def test_admission_counts_sequences_against_slots_plus_queue():
    eng = engine(max_batch_size=1, max_queue=2)  # not started: everything stays queued

    async def main():
        # a burst on an idle engine is admitted as the same requests arriving one by one: one
        # sequence takes the slot, two wait
        eng.add_request(request("a", "ab", max_tokens=1))
        eng.add_request(request("b", "ab", max_tokens=1))
        eng.add_request(request("c", "ab", max_tokens=1))
        with pytest.raises(QueueFullError, match="3 of 3 sequences"):
            eng.add_request(request("d", "ab", max_tokens=1))
        with pytest.raises(InvalidRequestError) as err:
            eng.add_request(request("e", "ab", max_tokens=0))
        assert err.value.param == "max_tokens"
        with pytest.raises(InvalidRequestError) as err:
            eng.add_request(request("a", "ab", max_tokens=1))
        assert err.value.param == "request_id"
        # aborting frees the capacity at once, before the engine thread has even run
        eng.abort("b")
        eng.add_request(request("d", "ab", max_tokens=1))
        with pytest.raises(QueueFullError):
            eng.add_request(request("f", "ab", max_tokens=1))

    asyncio.run(main())


def test_a_request_that_can_never_fit_is_invalid_not_full():
    eng = engine(max_batch_size=2, max_queue=4, max_request_sequences=64)

    async def main():
        with pytest.raises(InvalidRequestError, match="asks for 8 sequences") as err:
            eng.add_request(request("a", "ab", max_tokens=1, n=8))  # 8 > 2 slots + 4 queued
        assert err.value.param == "n"
        with pytest.raises(InvalidRequestError, match=r"4 prompt\(s\) x n=2"):
            eng.add_requests([request(f"p{i}", "ab", max_tokens=1, n=2) for i in range(4)])
        # a group is accepted whole or not at all: none of those four stayed queued
        assert eng.add_requests([request(f"p{i}", "ab", max_tokens=1, n=2) for i in range(3)])

    asyncio.run(main())


def test_per_request_sequence_cap_is_a_400():
    eng = engine(max_batch_size=4, max_queue=64, max_request_sequences=5)

    async def main():
        with pytest.raises(InvalidRequestError, match="at most 5"):
            eng.add_requests([request(f"p{i}", "ab", max_tokens=1, n=3) for i in range(2)])

    asyncio.run(main())


def test_shutdown_aborts_in_flight_work_and_refuses_new_requests():
    eng = engine(max_batch_size=2)
    eng.start()

    async def main():
        stream = eng.add_request(request("a", "hi", max_tokens=100_000))
        first = await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown, None)
        rest = await _collect(stream)
        with pytest.raises(EngineStoppedError):
            eng.add_request(request("b", "hi", max_tokens=1))
        return first, rest

    first, rest = asyncio.run(main())
    assert first.token_id is not None
    assert rest[-1].finish_reason is FinishReason.ABORT


def test_shutdown_with_a_timeout_lets_short_requests_finish():
    eng = engine(max_batch_size=2)
    eng.start()

    async def main():
        stream = eng.add_request(request("a", "hi", max_tokens=20))
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown, 30.0)
        return await _collect(stream)

    events = asyncio.run(main())
    assert events[-1].finish_reason is FinishReason.LENGTH and len(events) == 20


def test_shutdown_of_an_engine_never_started_ends_queued_streams():
    eng = engine(max_batch_size=1)

    async def main():
        stream = eng.add_request(request("a", "ab", max_tokens=3, n=2))
        eng.shutdown()
        return await _collect(stream)

    events = asyncio.run(main())
    assert [e.finish_reason for e in events] == [FinishReason.ABORT] * 2
