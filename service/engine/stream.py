"""The asyncio side of a request: an async iterator over its ``RequestOutput`` events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.engine.types import RequestOutput

log = logging.getLogger(__name__)
MAX_BACKLOG = 65536  # unread events before a request is cancelled (~13 MB of events)


class RequestStream:
    """Async iterator of a request's events, all ``n`` choices interleaved; it ends after the
    last choice's finishing event.

    The engine thread calls ``put`` (from any thread); it hands the events to the event loop with
    ``loop.call_soon_threadsafe``, so the loop only ever runs cheap queue operations. The backlog
    is bounded: a consumer that stops reading (a client that stopped reading its socket) while
    the engine keeps producing gets its request cancelled once ``max_backlog`` events wait, so
    its memory cannot grow without end (``overflowed`` is then True).
    """

    def __init__(
        self, request_id: str, n: int, loop: asyncio.AbstractEventLoop,
        on_abort: Callable[[str], None], max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self.request_id = request_id
        self._remaining = n
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._on_abort = on_abort
        self.max_backlog = max_backlog
        self.finished = False
        self.overflowed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def put(self, outputs: list[RequestOutput]) -> None:
        """Hand events over from the engine thread (thread-safe)."""
        put_all(self._loop, [(self, outputs)])

    def _check_backlog(self, incoming: int) -> None:
        # qsize from another thread is a racy read of a deque's length: good enough for a bound
        if not self.overflowed and self._queue.qsize() + incoming > self.max_backlog:
            self.overflowed = True
            log.warning("request %s: %d events unread; cancelling it (the client stopped reading)",
                        self.request_id, self._queue.qsize())
            self._on_abort(self.request_id)

    def _put_many(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._queue.put_nowait(out)

    def abort(self) -> None:
        """Cancel the request (e.g. the client went away); a final ``abort`` event follows."""
        self._on_abort(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._remaining == 0:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finish_reason is not None:
            self._remaining -= 1
            self.finished = self._remaining == 0
        return out


def put_all(loop: asyncio.AbstractEventLoop,
            items: list[tuple[RequestStream, list[RequestOutput]]]) -> None:
    """Hand a step's events to the streams of one event loop with one wake-up of that loop (one
    ``call_soon_threadsafe`` per step, not one per stream: at 32 streams the per-stream wake-ups
    cost the loop more than the events)."""
    for stream, outputs in items:
        stream._check_backlog(len(outputs))
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        for stream, _ in items:
            stream._on_abort(stream.request_id)


def _deliver(items: list[tuple[RequestStream, list[RequestOutput]]]) -> None:
    for stream, outputs in items:
        stream._put_many(outputs)
