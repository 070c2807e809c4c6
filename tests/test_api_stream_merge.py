"""A stream that falls behind catches up in one event: the per-request collector merges deltas.

The engine hands each step's tokens to the request's collector (``RequestStream``); a reader that
keeps up takes one step's tokens per read, one that lags takes everything waiting in one read, and
the SSE layer sends one chunk per choice per read. The chunk stays a valid OpenAI chunk: its text is
every waiting token's text, and its logprobs arrays carry one entry per token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
from conftest import live_server
from conftest import token_events as _events

from service.engine.stream import RequestStream
from service.engine.types import TokenEvents


def test_a_reader_that_lags_takes_every_waiting_event_in_one_read_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        stream = RequestStream("r", 1, loop, lambda _: None)
        for step in ([5], [6], [7, 8]):  # three steps' deliveries before the reader looks
            stream.put(_events("r", step))
        await asyncio.sleep(0)
        reads = []
        batches = stream.batches()
        reads.append(await anext(batches))
        stream.put(_events("r", [9], finish=True))
        reads.extend([b async for b in batches])
        return reads

    reads = asyncio.run(main())
    assert [r.token_ids for r in reads] == [[5, 6, 7, 8], [9]], "events were lost or reordered"
    assert list(reads[-1].finishes) == [0], "the finishing event lost its place"


def _stall(loop, seconds: float) -> threading.Event:
    """Block the server's event loop for ``seconds`` (the engine thread keeps stepping)."""
    started = threading.Event()

    def block() -> None:
        started.set()
        time.sleep(seconds)

    loop.call_soon_threadsafe(block)
    return started


def test_a_lagging_stream_sends_every_ready_token_in_one_valid_chunk(tiny_checkpoint):
    with live_server(tiny_checkpoint, max_batch_size=2) as srv:
        body = {"prompt": "ab", "max_tokens": 200, "stream": True, "logprobs": 1,
                "temperature": 0}
        chunks = []
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    break
            assert _stall(srv.loop, 0.5).wait(10)  # the engine produces while nobody reads
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
    sizes = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks]
    assert sum(sizes) == 200, f"tokens were lost or repeated: {sizes}"
    assert max(sizes) > 1, f"the stalled stream was never merged: {sizes}"
    for c in chunks:
        choice = c["choices"][0]
        lp = choice["logprobs"]
        n = len(lp["tokens"])
        assert c["object"] == "text_completion" and choice["index"] == 0
        assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        assert choice["text"] == "".join(lp["tokens"]), "the text and its tokens disagree"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_gathering_a_reads_worth_of_steps_equals_taking_them_one_at_a_time():
    plain = _events("r", [5, 6, 7])
    plain.request_ids[1] = "other"  # another stream's row of the same step
    with_logprobs = _events("r", [8, 9], finish=True)
    with_logprobs.logprobs = [-0.5, -1.5]
    with_logprobs.top_logprobs = [None, ()]
    parts = [(plain, [0, 2]), (with_logprobs, [0, 1]), (_events("r", [10]), [0])]
    taken = TokenEvents()
    for events, rows in parts:
        taken.take(events, rows)
    gathered = TokenEvents.gather(parts)
    assert gathered == taken, f"gather differs from take:\n{gathered}\n{taken}"
    assert gathered.token_ids == [5, 7, 8, 9, 10] and list(gathered.finishes) == [3], gathered
    assert gathered.logprobs == [None, None, -0.5, -1.5, None], gathered.logprobs


def test_gathering_one_row_of_a_step_equals_taking_it():
    step = _events("r", [5, 6, 7], finish=True)
    step.request_ids[:2] = ["a", "b"]  # other streams' rows of the same step
    step.logprobs, step.top_logprobs = [-0.5, -1.0, -1.5], [None, None, ()]
    for row in (0, 2):
        taken = TokenEvents()
        taken.take(step, [row])
        gathered = TokenEvents.gather([(step, [row])])
        assert gathered == taken, f"row {row}: gather differs from take:\n{gathered}\n{taken}"
    assert list(TokenEvents.gather([(step, [2])]).finishes) == [0], "the finish lost its row"


def test_next_batch_is_none_once_every_choice_has_finished():
    async def main():
        stream = RequestStream("r", 1, asyncio.get_running_loop(), lambda _: None)
        stream.put(_events("r", [5, 6], finish=True))
        first = await stream.next_batch()
        return first, await stream.next_batch()

    first, after = asyncio.run(main())
    assert first.token_ids == [5, 6] and after is None, (first, after)
