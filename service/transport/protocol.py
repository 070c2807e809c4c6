"""HTTP/1.1 with transport limits: uvicorn's httptools protocol, guarded before the app.

uvicorn parses HTTP well but leaves a slow or greedy client unbounded: httptools has no limit on
header bytes or count, and nothing times out a request's headers or body (a client that sends one
byte a second holds its connection, and a file descriptor, for ever). ``GuardedHttpProtocol`` adds
those limits at the parser's callbacks, before the app sees the request:

- request line and header fields over ``max_header_bytes``, or more than ``max_headers`` fields:
  431 with the API's error envelope;
- headers not complete ``header_timeout`` s after the connection opened (or after a request's
  first byte on a kept-alive connection): 408 (a connection that sent nothing is just closed);
- body not complete ``body_timeout`` s after the headers: 408;
- malformed framing (bad ``Content-Length``, bad chunk sizes, a garbled request line): 400 with
  the envelope instead of uvicorn's plain-text 400;
- more than ``max_pipelined`` requests queued behind the one being answered (HTTP/1.1
  pipelining, sent without reading the answers): the input past them is dropped unparsed, the
  queued requests are answered, then the connection is closed (RFC 9112 9.3.2: a pipelining
  client retries what was not answered). A queued request's body is held to uvicorn's 64 KiB
  high-water mark until it runs, so what one connection can make the server hold is bounded.

At the connection cap (``service.transport.listener``) a connection still receiving its body can
be closed to admit a new one, oldest first, with a 408, like one still sending its headers: slow
uploads cannot keep every slot (``evictable``, ``evict``).

A refused connection is half-closed and its unread input drained for ``LINGER_SECONDS`` before
the close, as nginx's lingering close does: closing a socket with unread input makes the kernel
send a reset, which can destroy the answer before the client reads it. The idle keep-alive timeout
is uvicorn's own (``timeout_keep_alive``); the connection cap is ``service.transport.listener``'s.

Each request's scope also carries a synchronous body write (``WRITE_BODY``: ``_write_chunk`` for
its response), which the SSE writer's lane (``service.api.sse.Lane``) uses to send a token from
the engine's hand-over without an ASGI ``send`` (a coroutine, and a task woken to run it).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httptools
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from service.transport.limits import TransportLimits

if TYPE_CHECKING:
    from service.transport.listener import Listener

log = logging.getLogger("service.transport")

LINGER_SECONDS = 2.0  # how long a refused connection's unread input is drained before closing
_HEADER_LINE_OVERHEAD = 4  # ": " and CRLF around each header field
_REQUEST_LINE_OVERHEAD = 16  # method, spaces, "HTTP/1.1", CRLF (an estimate: the URL dominates)
# the API's error types (service.api.errors) for the statuses the transport answers
_ERROR_TYPES = {400: "invalid_request_error", 408: "timeout_error", 431: "invalid_request_error"}


@dataclass(frozen=True)
class Refusal:
    """An answer the transport gives in the app's place, and the reason it is counted under."""

    status: int
    code: str
    message: str
    reason: str  # a label of gptserve_http_connections_closed_total

    def envelope(self) -> bytes:
        """The API's error envelope (``service.api.errors``) for this refusal, as JSON."""
        error = {"message": self.message, "type": _ERROR_TYPES.get(self.status, "error"),
                 "param": None, "code": self.code}  # fmt: skip
        return json.dumps({"error": error}).encode()


# The scope key of ``_write_chunk`` for the request's response (what service.api.sse reads).
WRITE_BODY = "gptserve.write_body"


def _write_chunk(cycle: RequestResponseCycle, body: bytes) -> bool:
    """Write ``body`` as one chunk of ``cycle``'s response now, as uvicorn's ``send`` would for a
    ``http.response.body`` message with more to come, when that ``send`` would not wait: the
    response has started, is chunked and not complete, the client is connected and reading (the
    transport's buffer is under its high-water mark). False, and nothing written, otherwise.
    A synchronous call: a stream's token goes out from the engine's hand-over, with no task."""
    if (cycle.disconnected or cycle.flow.write_paused or not cycle.response_started
            or cycle.response_complete or not cycle.chunked_encoding or not body):
        return False
    cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
    return True


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request over a limit."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """One client connection: uvicorn's HTTP/1.1 handling plus the limits above.

    Owns the connection's one deadline (for the headers, then for the body), the tally of the
    current request's header bytes and fields, the bound on pipelined requests, and since when
    it has been waiting on its client (the listener closes the connection that has waited
    longest, among those without a request in flight, when it must make room).
    """

    def __init__(self, config, server_state, app_state, *, listener: Listener) -> None:
        super().__init__(config, server_state, app_state)
        self.listener = listener
        self.limits: TransportLimits = listener.limits
        self.idle_since = time.monotonic()  # since when it waits on the client: idle, head or body
        self._reading_head = True  # between requests, or part-way through a request's headers
        self._head_bytes = 0  # request line + fields seen by the parser for this request
        self._unparsed = 0  # bytes fed while the head is incomplete (the parser buffers them)
        self._num_headers = 0
        self._refusal: Refusal | None = None  # set by a parser callback
        self._lingering = False
        self._pipeline_full = False  # input past max_pipelined queued requests is dropped
        self._deadline: asyncio.TimerHandle | None = None

    # -- what the listener asks ------------------------------------------------------------

    @property
    def evictable(self) -> bool:
        """No request in flight: idle between requests, still sending a request's headers, or
        still sending its body (not answered yet)."""
        if self.transport is None or self.transport.is_closing() or self._lingering:
            return False
        return (self._reading_head and not self._responding) or self._receiving_body

    def evict(self) -> None:
        """Close to make room (the listener counts it): a request still sending its body gets
        408, an idle connection or one still sending its headers is just closed."""
        if self._receiving_body:
            message = "the request body was not complete when the server needed the connection"
            # no lingering close: the slot is wanted now (the client sent nothing unread, so
            # the close is a FIN; if it sends more, it gets a reset, as it would anyway)
            refusal = Refusal(408, "request_timeout", message, "evicted")
            self._refuse(refusal, count=False, linger=False)
        else:
            self.transport.close()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.listener.opened(self)
        self._arm(self.limits.header_timeout, self._header_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.listener.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, with the header tally and our answers to parse errors.
        if self._lingering or self._pipeline_full:
            return  # refused: drain and drop what the client is still sending
        self._unset_keepalive_if_required()
        if self._reading_head:
            if self._deadline is None and not self._responding:
                self._arm(self.limits.header_timeout, self._header_timed_out)
            self._unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as err:
            if self._pipeline_full:  # not an error to answer: the queued requests are
                return
            malformed = Refusal(400, "invalid_http", f"malformed HTTP request: {err}", "malformed")
            self._refuse(self._refusal or malformed)
            return
        if self._reading_head and self._unparsed > self.limits.max_header_bytes:
            # A header still being received sits in the parser's buffer: bound it here.
            self._refuse(self._too_large())

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = _REQUEST_LINE_OVERHEAD
        self._num_headers = 0

    def on_url(self, url: bytes) -> None:  # called with each piece of the URL as it arrives
        self._tally(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._num_headers += 1
        if self._num_headers > self.limits.max_headers:
            self._refusal = Refusal(
                431,
                "too_many_headers",
                f"the request has more than {self.limits.max_headers} header fields",
                "too_many_headers",
            )
            raise _Refused
        self._tally(len(name) + len(value) + _HEADER_LINE_OVERHEAD)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        if self._responding and len(self.pipeline) >= self.limits.max_pipelined:
            self._stop_pipeline()
            raise _Refused  # stops the parser: what follows is never parsed
        self._reading_head = False
        self._unparsed = 0
        self.idle_since = time.monotonic()  # now waiting on the body
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            cycle.scope[WRITE_BODY] = functools.partial(_write_chunk, cycle)
        self._arm(self.limits.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading_head = True  # what follows is the next request's head
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timeout
        self.idle_since = time.monotonic()

    # -- limits ----------------------------------------------------------------------------

    @property
    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    @property
    def _receiving_body(self) -> bool:
        """Headers in, body not yet complete, nothing answered: the request is not running."""
        cycle = self.cycle
        return (
            not self._reading_head
            and cycle is not None
            and cycle.more_body
            and not cycle.response_started
            and not self.pipeline
        )

    def _stop_pipeline(self) -> None:
        """Too many requests queued: answer those, then close; parse and read nothing more."""
        self._pipeline_full = True
        self.listener.refused("pipeline_full")
        log.debug("closing %s after its %d queued requests", self.client, len(self.pipeline))
        self.cycle.keep_alive = False  # the last queued request's answer closes the connection
        self.flow.pause_reading()

    def _tally(self, nbytes: int) -> None:
        self._head_bytes += nbytes
        if self._head_bytes > self.limits.max_header_bytes:
            self._refusal = self._too_large()
            raise _Refused

    def _too_large(self) -> Refusal:
        return Refusal(
            431,
            "header_too_large",
            f"the request line and headers are larger than {self.limits.max_header_bytes} bytes",
            "header_too_large",
        )

    def _header_timed_out(self) -> None:
        self._deadline = None
        if self._unparsed == 0:  # connected (or kept alive) and silent: nothing to answer
            self.listener.refused("header_timeout")
            self.transport.close()
            return
        seconds = f"{self.limits.header_timeout:g}"
        message = f"the request headers did not arrive within {seconds}s"
        self._refuse(Refusal(408, "request_timeout", message, "header_timeout"))

    def _body_timed_out(self) -> None:
        self._deadline = None
        if self.cycle is not None and self.cycle.response_started:
            # Answered already (e.g. 413 before the body): stop taking the rest, say nothing.
            self.listener.refused("body_timeout")
            self.transport.close()
            return
        message = f"the request body did not arrive within {self.limits.body_timeout:g}s"
        self._refuse(Refusal(408, "request_timeout", message, "body_timeout"))

    def _refuse(self, refusal: Refusal, *, count: bool = True, linger: bool = True) -> None:
        """Answer with the error envelope (if no response has started), then close (after a
        lingering drain of the client's input unless ``linger`` is False)."""
        self._disarm()
        if count:
            self.listener.refused(refusal.reason)
        if self.transport.is_closing() or self._lingering:
            return
        log.debug("%d to %s: %s", refusal.status, self.client, refusal.message)
        self._lingering = True
        if self.cycle is not None and not self.cycle.response_complete:
            if self.cycle.response_started:  # mid-response: nothing can be said any more
                self.transport.close()
                return
            # The app is waiting for the body: it sees a disconnect, and whatever it still
            # sends is dropped instead of following our answer on the wire.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        body = refusal.envelope()
        head = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if linger:
            self._arm(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()  # after the answer is flushed

    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
