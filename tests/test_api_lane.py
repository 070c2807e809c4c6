"""The stream's lane: a token goes from the engine's hand-over to the socket with no task woken.

``RequestStream.sink`` (``service.engine.stream``) takes a stream's events on the event loop when
it is ready, after every hand-over queued on the loop (so a lagging loop still merges); the
server's ``sse.Lane`` folds them into the job and writes them through the transport's synchronous
write (``service.transport.protocol._write_chunk``); what cannot go out at once waits for the
stream's writer, in order. Driven here piece by piece, then through the production server with a
client that keeps up and one that stops reading.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from types import SimpleNamespace

import httpx
from conftest import live_server, wait_until
from conftest import token_events as _events

from service.api import sse
from service.engine.stream import RequestStream, put_all
from service.engine.types import TokenEvents
from service.transport import protocol


class _Sink:
    def __init__(self, ready: bool = True) -> None:
        self.is_ready = ready
        self.took: list[list[int | None]] = []

    def ready(self) -> bool:
        return self.is_ready

    def consume(self, events: TokenEvents, rows: list[int] | None) -> None:
        rows = range(len(events)) if rows is None else rows
        self.took.append([events.token_ids[r] for r in rows])


def test_a_ready_sink_takes_each_step_and_the_reader_is_never_woken():
    async def main():
        loop = asyncio.get_running_loop()
        stream = RequestStream("r", 1, loop, lambda _: None)
        stream.sink = sink = _Sink()
        reader = asyncio.ensure_future(stream.next_batch())
        await asyncio.sleep(0)
        step = _events("r", [5, 6, 7])
        step.request_ids[1] = "other"  # another stream's row of the same step
        put_all(loop, step, [(stream, [0, 2])])  # this stream's rows of the step
        for _ in range(3):
            await asyncio.sleep(0)
        put_all(loop, _events("r", [8]), [(stream, [0])])
        for _ in range(3):
            await asyncio.sleep(0)
        woken = reader.done()
        reader.cancel()
        return sink.took, woken

    took, woken = asyncio.run(main())
    assert took == [[5, 7], [8]], f"the sink did not take each step's own rows in order: {took}"
    assert not woken, "the reader was woken although the sink took everything"


def test_hand_overs_queued_before_the_flush_reach_the_sink_as_one_read():
    async def main():
        loop = asyncio.get_running_loop()
        stream = RequestStream("r", 1, loop, lambda _: None)
        stream.sink = sink = _Sink()
        for step in ([5], [6], [7, 8]):  # three steps handed over before the loop runs
            stream.put(_events("r", step))
        for _ in range(5):
            await asyncio.sleep(0)
        return sink.took

    assert asyncio.run(main()) == [[5, 6, 7, 8]], "a lagging loop's hand-overs were not merged"


def test_a_sink_that_is_not_ready_leaves_the_events_to_the_reader():
    async def main():
        loop = asyncio.get_running_loop()
        stream = RequestStream("r", 1, loop, lambda _: None)
        stream.sink = sink = _Sink(ready=False)
        stream.put(_events("r", [5]))
        first = await stream.next_batch()
        sink.is_ready = True
        stream.put(_events("r", [6], finish=True))
        for _ in range(3):
            await asyncio.sleep(0)
        return first, sink.took, await stream.next_batch()

    first, took, after = asyncio.run(main())
    assert first.token_ids == [5], first
    assert took == [[6]], "the finishing step did not reach the ready sink"
    assert after is None, "the stream did not count the end the sink took"


def test_a_nudge_wakes_the_reader_with_an_empty_read_and_later_events_follow():
    async def main():
        loop = asyncio.get_running_loop()
        stream = RequestStream("r", 1, loop, lambda _: None)
        reader = asyncio.ensure_future(stream.next_batch())
        await asyncio.sleep(0)
        stream.nudge()
        empty = await reader
        stream.put(_events("r", [9], finish=True))
        return empty, await stream.next_batch()

    empty, then = asyncio.run(main())
    assert len(empty) == 0 and empty.token_ids == [], empty
    assert then.token_ids == [9], then


def _tokens(events, rows):
    return [b"tok%d;" % events.token_ids[r] for r in (rows or range(len(events)))]


def _lane(write_ok: bool, make=_tokens):
    stream = SimpleNamespace(sink=None, nudged=0)
    stream.nudge = lambda: setattr(stream, "nudged", stream.nudged + 1)
    written: list[bytes] = []
    done = {"now": False}

    def write(body: bytes) -> bool:
        if write_ok:
            written.append(body)
        return write_ok

    lane = sse.Lane(stream, make, lambda: done["now"])
    lane.write = write
    return lane, stream, written, done


def test_the_lane_writes_at_once_only_while_its_writer_is_parked():
    lane, stream, written, _ = _lane(write_ok=True)
    assert stream.sink is lane
    assert not lane.ready(), "a writer that is not waiting may still be sending: not ready"
    lane.parked = True
    assert lane.ready()
    lane.consume(_events("r", [1, 2]), [1])
    assert written == [b"tok2;"] and lane.take() == [] and stream.nudged == 0
    lane.close()
    assert stream.sink is None and not lane.ready()


def test_what_the_lane_cannot_write_is_kept_in_order_for_the_writer():
    lane, stream, _, _ = _lane(write_ok=False)  # the client is not reading
    lane.parked = True
    lane.consume(_events("r", [1, 2]), None)
    assert stream.nudged == 1, "the writer was not woken for what could not go out"
    assert not lane.ready(), "the lane must not write past what it kept"
    assert lane.take() == [b"tok1;", b"tok2;"] and lane.take() == []
    assert lane.ready()


def test_the_jobs_end_is_left_to_the_writer_even_when_it_could_be_written():
    lane, stream, written, done = _lane(write_ok=True)
    lane.parked = True
    done["now"] = True  # e.g. a stop string ended the job while folding these events
    lane.consume(_events("r", [3]), None)
    assert written == [] and stream.nudged == 1 and lane.take() == [b"tok3;"]


def test_the_synchronous_write_refuses_whenever_uvicorns_send_would_wait_or_fail():
    class Transport:
        def __init__(self) -> None:
            self.out: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.out.append(data)

    def cycle(**over):
        fields = dict(disconnected=False, flow=SimpleNamespace(write_paused=False),
                      response_started=True, response_complete=False, chunked_encoding=True,
                      transport=Transport())
        fields.update(over)
        return SimpleNamespace(**fields)

    ok = cycle()
    assert protocol._write_chunk(ok, b"data: x\n\n")
    assert ok.transport.out == [b"9\r\ndata: x\n\n\r\n"], "not one HTTP/1.1 chunk"
    for why in (dict(disconnected=True), dict(flow=SimpleNamespace(write_paused=True)),
                dict(response_started=False), dict(response_complete=True),
                dict(chunked_encoding=False)):
        refused = cycle(**why)
        assert not protocol._write_chunk(refused, b"data: x\n\n"), why
        assert refused.transport.out == [], f"wrote although {why}"


def _count_lane_writes(monkeypatch) -> list[int]:
    counts = [0, 0]  # [events the lane took, writes the transport refused]
    consume, write_chunk = sse.Lane.consume, protocol._write_chunk

    def counting_consume(self, events, rows):
        counts[0] += len(events) if rows is None else len(rows)
        return consume(self, events, rows)

    def counting_write(cycle, body):
        ok = write_chunk(cycle, body)
        counts[1] += not ok
        return ok

    monkeypatch.setattr(sse.Lane, "consume", counting_consume)
    monkeypatch.setattr(protocol, "_write_chunk", counting_write)
    return counts


def test_a_stream_that_keeps_up_goes_out_through_the_lane_with_the_same_text(
        tiny_checkpoint, monkeypatch):
    counts = _count_lane_writes(monkeypatch)
    body = {"prompt": "ab", "max_tokens": 60, "temperature": 0}
    with live_server(tiny_checkpoint) as srv:
        idle_tasks = srv.num_tasks()
        whole = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
        events = []
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True},
                          timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        wait_until(lambda: srv.num_tasks() <= idle_tasks, what="the request's tasks to end")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == whole["choices"][0]["text"], "the lane's text differs from the whole answer"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert counts[0] >= 50, f"the lane took {counts[0]} of 60 tokens: the writer took the rest"


def _small_server_send_buffer(srv, client: tuple[str, int]) -> None:
    """Shrink the kernel's send buffer of the server's side of ``client``'s connection, so a
    client that stops reading backs the server's writes up into its transport within a few
    hundred events (on loopback the kernel would otherwise take megabytes)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for conn in list(srv.server.server_state.connections):
            transport = conn.transport
            if transport is not None and transport.get_extra_info("peername") == client:
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                return
        time.sleep(0.01)
    raise AssertionError("the server never saw the connection")


def test_a_client_that_stops_reading_gets_every_token_in_order_once_it_reads(
        tiny_checkpoint, monkeypatch):
    counts = _count_lane_writes(monkeypatch)
    n = 3000
    body = json.dumps({"prompt": "ab", "max_tokens": n, "temperature": 0, "stream": True,
                       "logprobs": 2}).encode()
    with live_server(tiny_checkpoint) as srv:
        whole = httpx.post(srv.url + "/v1/completions", json={**json.loads(body), "stream": False},
                           timeout=120).json()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        _small_server_send_buffer(srv, sock.getsockname())  # (loopback's would hold it all)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b"
                     % (len(body), body))
        received = [sock.recv(1024)]  # the head and the first events
        time.sleep(2.0)  # stop reading while the engine keeps producing
        sock.settimeout(120)
        while chunk := sock.recv(65536):
            received.append(chunk)
        sock.close()
    raw = b"".join(received)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    body_bytes, rest = b"", payload
    while True:  # undo the chunked framing
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body_bytes, rest = body_bytes + rest[:size], rest[size + 2:]
    events = [e[6:] for e in body_bytes.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    sizes = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks]
    assert sum(sizes) == n, f"tokens were lost or repeated: {sum(sizes)} of {n}"
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert counts[1] > 0, "the transport never refused a write: the client never fell behind"
    assert max(sizes) > 1, "what piled up while the client did not read was not merged"


def test_what_folding_the_events_raises_reaches_the_writer_not_the_event_loop():
    def broken(events, rows):
        raise RuntimeError("the tokenizer broke")

    lane, stream, _, _ = _lane(write_ok=True, make=broken)
    lane.parked = True
    lane.consume(_events("r", [1]), None)  # on the event loop: must not raise there
    assert stream.nudged == 1 and not lane.ready()
    try:
        lane.take()
    except RuntimeError as err:
        assert "tokenizer" in str(err)
    else:
        raise AssertionError("the writer was not told what failed")
    assert lane.take() == [] and lane.ready()


def test_a_failing_stream_does_not_keep_the_others_of_its_hand_over_from_their_sinks():
    class Failing(_Sink):
        def consume(self, events, rows):
            raise RuntimeError("boom")

    async def main():
        loop = asyncio.get_running_loop()
        first = RequestStream("a", 1, loop, lambda _: None)
        second = RequestStream("b", 1, loop, lambda _: None)
        first.sink, second.sink = Failing(), _Sink()
        step = _events("a", [1, 2])
        step.request_ids[1] = "b"
        put_all(loop, step, [(first, [0]), (second, [1])])
        for _ in range(3):
            await asyncio.sleep(0)
        put_all(loop, _events("b", [3]), [(second, [0])])
        for _ in range(3):
            await asyncio.sleep(0)
        return second.sink.took

    assert asyncio.run(main()) == [[2], [3]], "the second stream's events were stranded"
