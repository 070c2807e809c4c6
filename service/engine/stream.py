"""The asyncio side of a request: a collector of its events that a coroutine reads in batches."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from service.engine.types import RequestOutput, TokenEvents

log = logging.getLogger(__name__)
MAX_BACKLOG = 65536  # unread events before a request is cancelled (a few MB of columns)
_ENDED = object()  # a merged stream's end (MergedStreams)


class StreamSink(Protocol):
    """A consumer that takes a stream's events on the event loop as they are handed over, in
    place of waking the stream's reader (the server's SSE writer: ``service.api.sse.Lane``)."""

    def ready(self) -> bool:
        """Whether it takes events now (False: they wait for the reader, who is woken)."""

    def consume(self, events: TokenEvents, rows: list[int] | None) -> None:
        """Take every event that waited, as one read would have: ``rows`` of ``events``
        (None: all of them; one step's rows are not gathered into a new ``TokenEvents``)."""


class RequestStream:
    """Collects one request's events (all ``n`` choices interleaved) until its consumer reads
    them; ``async for events in stream`` yields every event waiting since the last read as one
    ``TokenEvents``, and ends after the last choice's finishing event.

    ``async for out in stream`` yields the same events one ``RequestOutput`` at a time (tests and
    simple callers); the server reads ``next_batch()`` (``batches()`` is it as an async
    iterator). A consumer that keeps up gets one step's events per read; one that falls behind
    (a slow client, a busy event loop) gets everything that piled up in one read, so its
    per-read work (one SSE event per choice) does not grow with the lag (vLLM's output collector
    merges deltas the same way). A ``sink`` (the server's SSE lane) takes the events in the
    reader's place while it is ready, with the same merging (``flush``). The engine thread hands
    a step's events to the event loop with one
    ``loop.call_soon_threadsafe`` per loop (``put_all``); an engine-core client that reads its
    core on the streams' own loop hands them over directly (``deliver``). The backlog is
    bounded: a consumer that stops reading while the engine keeps producing gets its request
    cancelled once ``max_backlog`` events wait, so its memory cannot grow without end
    (``overflowed`` is True).
    """

    def __init__(
        self, request_id: str, n: int, loop: asyncio.AbstractEventLoop,
        on_abort: Callable[[str], None], max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self.request_id = request_id
        self._remaining = n  # choices whose finishing event has not been read
        self._loop = loop
        # the rows of each step's events handed over since the last read, gathered into one
        # ``TokenEvents`` when the consumer reads (``TokenEvents.gather``), not row by row
        self._parts: list[tuple[TokenEvents, list[int]]] = []
        self._waiting = 0  # events in _parts
        self._waiter: asyncio.Future | None = None
        self._outs: deque[RequestOutput] = deque()  # read, not yet iterated (``__anext__``)
        self._on_abort = on_abort
        self.max_backlog = max_backlog
        self.finished = False
        self.overflowed = False
        self.sink: StreamSink | None = None  # takes events in place of the reader when ready
        self._flush_due = False  # a ``flush`` is queued on the loop
        self._nudged = False  # the reader is woken with nothing to read (``nudge``)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def put(self, events: TokenEvents) -> None:
        """Hand all of ``events`` (this request's) over from the engine thread (thread-safe)."""
        put_all(self._loop, events, [(self, list(range(len(events))))])

    def _check_backlog(self, incoming: int) -> None:
        # a count the event loop updates, read from the engine's thread: racy, good enough for
        # a bound
        waiting = self._waiting
        if not self.overflowed and waiting + incoming > self.max_backlog:
            self.overflowed = True
            log.warning("request %s: %d events unread; cancelling it (the client stopped reading)",
                        self.request_id, waiting)
            self._on_abort(self.request_id)

    def _collect(self, events: TokenEvents, rows: list[int]) -> bool:
        """On the event loop: add ``rows`` of a step's events and wake the consumer. With a
        ``sink``, no wake-up: True asks the caller to queue a ``flush`` (one for every stream of
        a hand-over; hand-overs queued before it run first, so a loop that lags merges them)."""
        self._parts.append((events, rows))
        self._waiting += len(rows)
        if self.sink is not None:
            due, self._flush_due = self._flush_due, True
            return not due
        self._wake()
        return False

    def flush(self) -> None:
        """Hand what waits to the sink if it is ready, else wake the reader."""
        self._flush_due = False
        if not self._waiting:
            return
        sink = self.sink
        if sink is not None and sink.ready():
            parts = self._parts
            if len(parts) == 1 and not parts[0][0].finishes:  # a step's token or two: as is
                self._parts, self._waiting = [], 0
                sink.consume(*parts[0])
            else:
                sink.consume(self._read(), None)
        else:
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def nudge(self) -> None:
        """Wake the reader with nothing to read: its ``next_batch`` returns an empty
        ``TokenEvents`` (the sink left something for it)."""
        self._nudged = True
        self._wake()

    def abort(self) -> None:
        """Cancel the request (e.g. the client went away); a final ``abort`` event follows."""
        self._on_abort(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._outs:
            events = await self.next_batch()
            if events is None:
                raise StopAsyncIteration
            self._outs.extend(events.events())
        return self._outs.popleft()

    async def batches(self) -> AsyncIterator[TokenEvents]:
        """Every event waiting since the last read, as one ``TokenEvents`` per read."""
        while (events := await self.next_batch()) is not None:
            yield events

    async def next_batch(self) -> TokenEvents | None:
        """Every event waiting since the last read, as one ``TokenEvents`` (waits for one);
        None once every choice's finishing event has been read. The server's per-token read:
        one coroutine, no async generator between it and the consumer."""
        if self._remaining <= 0:
            return None
        while not self._waiting:
            if self._nudged:
                self._nudged = False
                return TokenEvents()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._nudged = False
        return self._read()

    def _read(self) -> TokenEvents:
        events = TokenEvents.gather(self._parts)
        self._parts, self._waiting = [], 0
        self._remaining -= len(events.finishes)
        self.finished = self._remaining <= 0
        return events


def put_all(loop: asyncio.AbstractEventLoop, events: TokenEvents,
            items: list[tuple[RequestStream, list[int]]]) -> None:
    """Hand a step's events (``rows`` of ``events`` to each stream) to the streams of one event
    loop with one wake-up of that loop (one ``call_soon_threadsafe`` per step, not one per
    stream: at 32 streams the per-stream wake-ups cost the loop more than the events)."""
    _check_backlogs(items)
    try:
        loop.call_soon_threadsafe(_deliver, events, items)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        for stream, _ in items:
            stream._on_abort(stream.request_id)


def deliver(events: TokenEvents, items: list[tuple[RequestStream, list[int]]]) -> None:
    """``put_all`` called on the streams' own event loop: hand the events over at once."""
    _check_backlogs(items)
    _deliver(events, items)


def _check_backlogs(items: list[tuple[RequestStream, list[int]]]) -> None:
    for stream, rows in items:
        stream._check_backlog(len(rows))


def _deliver(events: TokenEvents, items: list[tuple[RequestStream, list[int]]]) -> None:
    due = [stream for stream, rows in items if stream._collect(events, rows)]
    if due:
        due[0]._loop.call_soon(_flush, due)


def _flush(streams: list[RequestStream]) -> None:
    for stream in streams:
        try:
            stream.flush()
        except Exception:  # one stream's failure must not leave the others' events unread
            log.exception("request %s: handing its events over failed", stream.request_id)


class MergedStreams:
    """The events of several streams (the server's job of several prompts), interleaved as they
    arrive: one pump task per stream into one queue; ``next_batch`` as ``RequestStream``'s."""

    def __init__(self, streams) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._left = len(streams)
        self._tasks = [asyncio.create_task(self._pump(s)) for s in streams]

    async def _pump(self, stream) -> None:
        try:
            while (events := await stream.next_batch()) is not None:
                self._queue.put_nowait(events)
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait(err)
        finally:
            self._queue.put_nowait(_ENDED)

    async def next_batch(self) -> TokenEvents | None:
        while self._left:
            item = await self._queue.get()
            if item is _ENDED:
                self._left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                return item
        return None

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
