"""Server-sent events for streamed completions and chat: framing (OpenAI's ``data: {...}``
lines) and the response that writes them (``EventStreamResponse``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

# the server's synchronous body write, where it offers one: write(body) -> bool (False: it cannot
# go out at once, the client is not reading or has gone, and nothing was written)
from service.transport.protocol import WRITE_BODY

MEDIA_TYPE = "text/event-stream"
# No caching, and tell nginx-style proxies not to buffer the stream.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# ...as a response's raw header list (what Starlette's ``init_headers`` makes of them, built
# once: the same for every stream)
RAW_HEADERS = (
    *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in HEADERS.items()),
    (b"content-type", f"{MEDIA_TYPE}; charset=utf-8".encode("latin-1")),
)
DONE = b"data: [DONE]\n\n"
# The scope key under which the outermost middleware (service.api.access) leaves the ``send`` it
# was given: the server's, below every middleware of the app.
DIRECT_SEND = "gptserve.direct_send"


_string = json.encoder.encode_basestring  # a JSON string literal; non-ASCII kept (UTF-8)
# compact JSON, non-ASCII kept; one encoder for every event (json.dumps builds one per call)
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _json(data: Any) -> bytes:
    return _encode(data).encode()


def event(data: Any) -> bytes:
    """One SSE event carrying ``data`` as compact JSON (UTF-8; strings are always valid)."""
    return b"data: " + _json(data) + b"\n\n"


class ChunkFramer:
    """Frames a stream's chunks; the fields every chunk repeats are encoded once (the per-token
    path is the server's hottest Python code). ``chat``: choices carry ``delta.content`` (chat
    completion chunks) rather than ``text``."""

    def __init__(self, head: dict[str, Any], *, chat: bool = False) -> None:
        self._head = head
        self._prefix = b"data: " + _json(head)[:-1] + b',"choices":['
        self._text_key = b'"delta":{"content":' if chat else b'"text":'
        self._text_end = b"}" if chat else b""

    def choice(self, choice: dict[str, Any]) -> bytes:
        """A chunk carrying one choice's delta."""
        return self._prefix + _json(choice) + b"]}\n\n"

    def text(self, index: int, text: str) -> bytes:
        """The common chunk: new text of an unfinished choice without logprobs (the same bytes
        ``choice`` would give, built without a dict and a full JSON encode)."""
        return b"".join(
            (
                self._prefix,
                b'{"index":%d,' % index,
                self._text_key,
                _string(text).encode(),
                self._text_end,
                b',"logprobs":null,"finish_reason":null}]}\n\n',
            )
        )

    def usage(self, usage: dict[str, Any]) -> bytes:
        """The final usage chunk: ``choices`` is empty."""
        return event({**self._head, "choices": [], "usage": usage})


class Lane:
    """Writes a stream's tokens as the engine's steps hand them over, with no task woken.

    With one event per token, what a token cost the event loop was mostly waking the request's
    task: a future, the task's step, the resumption of every coroutine of the request's
    middleware chain, the response's ``send``. The lane is the ``RequestStream``'s sink
    (``service.engine.stream``): after a hand-over (after every hand-over queued on the loop, so
    a loop that lags still merges a stream's tokens into one event), while the stream's writer
    waits for events (``parked``: everything it wrote before has gone out), what waited is
    folded into the job (``make(events, rows)``: the SSE events they make) and written at once
    through the server's synchronous write (``write``, from the scope). What cannot go out now
    (a client that is not reading) or ends the job is kept for the writer (``take``), which is
    woken (``nudge``) and sends it before anything newer.
    """

    def __init__(self, stream, make: Callable[[Any, list[int] | None], list[bytes]],
                 done: Callable[[], bool]) -> None:
        self.stream = stream
        self.make = make
        self.done = done
        self.write: Callable[[bytes], bool] | None = None  # set from the scope by the response
        self.parked = False  # the writer waits on the stream, all it wrote written
        self._kept: list[bytes] | None = None
        self._error: Exception | None = None
        stream.sink = self

    def ready(self) -> bool:
        return self.parked and self._kept is None and self.write is not None

    def consume(self, events, rows: list[int] | None) -> None:
        try:
            chunks = self.make(events, rows)
        except Exception as err:  # raised in the writer's task, as if it had read these events
            self._error = err
            self._keep([])
            return
        if self.done():  # the job's end: the writer sends it (usage, [DONE], the response's end)
            self._keep(chunks)
        elif chunks and not self.write(chunks[0] if len(chunks) == 1 else b"".join(chunks)):
            self._keep(chunks)  # the client is not reading: the writer waits for it

    def _keep(self, chunks: list[bytes]) -> None:
        self._kept = chunks
        self.stream.nudge()

    def take(self) -> list[bytes]:
        """What the lane made but did not write (the writer sends it before anything newer);
        raises what folding the events raised."""
        kept, self._kept = self._kept, None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return [] if kept is None else kept

    def close(self) -> None:
        """The writer is done: nothing more is taken."""
        self.stream.sink = None
        self.parked = False


class EventStreamResponse(Response):
    """Owns writing one SSE stream: ``events`` (each item one or more whole events) as they
    come, and the watch for a client that goes away.

    The response's start (status, headers) and its end go through every middleware's ``send``;
    the events between go straight to the ``send`` the outermost middleware was given
    (``DIRECT_SEND`` in the scope), skipping the wrappers in between. Every middleware of this
    app (the access log, CORS, the gate, Starlette's and FastAPI's error handling) looks only at
    a response's start and end, and with one event per token the chain of wrappers was a
    per-token cost; a middleware that rewrites bodies (compression) would have to sit outside the
    access log. An item that ends with ``DONE`` ends the stream: it goes out with the
    response's end, in one write (``events`` is closed there). A disconnect cancels the writing
    (the request's own task), which closes ``events`` at its ``await`` (its ``finally`` frees
    the engine's work at once). Starlette's ``StreamingResponse`` does the same with an anyio
    task group of two tasks and sends every event through every wrapper. With a ``lane``, most
    tokens never reach ``events``: the lane writes them from the engine's hand-over through the
    server's synchronous write (``WRITE_BODY`` in the scope), bypassing uvicorn's ``send`` too.
    """

    media_type = MEDIA_TYPE

    def __init__(self, events: AsyncIterator[bytes], lane: Lane | None = None) -> None:
        self.events = events
        self.lane = lane
        self.status_code = 200
        self.background = None
        self.raw_headers = list(RAW_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # the events are written by this task; one more watches for a disconnect and cancels
        # this one when it comes (asyncio.timeout's pattern: the cancel is told apart from any
        # other by ``uncancel``), so a stream costs one task, not a writer and a watcher
        task = asyncio.current_task()
        left = False  # the client went away while the events were being written
        writing = True

        def on_disconnect(_: asyncio.Future) -> None:
            nonlocal left
            if writing:  # a disconnect (or the response's end) after the writing is ignored
                left = True
                task.cancel()

        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(on_disconnect)
        try:
            await self._write(scope, send)
        except asyncio.CancelledError:
            if not left or task.uncancel():  # not (only) ours: this request was cancelled
                raise
        finally:
            writing = False
            watcher.cancel()

    async def _write(self, scope: Scope, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        direct = scope.get(DIRECT_SEND, send)
        if self.lane is not None:
            self.lane.write = scope.get(WRITE_BODY)
        events = self.events
        last = b""
        try:
            async for chunk in events:
                if chunk.endswith(DONE):  # the stream's end: sent with the response's end
                    last = chunk
                    break
                await direct({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await events.aclose()  # at once, not when collected (a no-op once it has ended)
        await send({"type": "http.response.body", "body": last, "more_body": False})


async def _disconnected(receive: Receive) -> None:
    """Return when the client has gone (or the response has ended: the server then answers
    ``http.disconnect`` too). The request body was read before the response started."""
    while (await receive())["type"] != "http.disconnect":
        pass
