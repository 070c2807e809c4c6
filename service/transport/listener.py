"""The connection cap: accept client connections within a budget.

``Listener`` accepts connections on the sockets ``service.transport.sockets.bind`` opened,
itself rather than through asyncio's ``create_server``, so that it can stop at a cap: the event loop's own accept loop takes every
pending connection at once and, past the open-file limit, fails on ``EMFILE`` with the process's
other files (checkpoint reloads, /proc for metrics) starved too. At the cap a new connection
waits in the kernel's backlog, unless some open connection has no request in flight (idle between
requests, or silent or slow while sending its headers): then the longest-idle one is closed to
make room, as nginx reuses its keep-alive connections. The cap is ``--max-connections``, lowered at
start to fit the open-file limit (``service.transport.sockets.fit_to_file_limit``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable

from service.metrics import Metrics
from service.transport.limits import TransportLimits
from service.transport.protocol import GuardedHttpProtocol

log = logging.getLogger("service.transport")
ACCEPT_BATCH = 128  # connections one wake-up of an accept loop takes from the backlog, at most


class Listener:
    """Owns the listening sockets' accept loops, the open connections, and the cap on them."""

    def __init__(
        self,
        sockets: list[socket.socket],
        make_protocol: Callable[[Listener], GuardedHttpProtocol],
        limits: TransportLimits,
        metrics: Metrics,
    ) -> None:
        self.sockets = sockets
        self.make_protocol = make_protocol
        self.limits = limits
        self.metrics = metrics
        self._open: set[GuardedHttpProtocol] = set()
        self._reserved = 0  # accepted connections, counted from accept() to their close
        self._room = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._connecting: set[asyncio.Task] = set()  # accepted connections being connected

    def start(self) -> None:
        self.metrics.connections_limit.set(self.limits.max_connections)
        self._tasks = [asyncio.create_task(self._accept(sock)) for sock in self.sockets]

    async def stop(self) -> None:
        """Stop accepting and close the listening sockets (open connections are uvicorn's)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self.sockets:
            sock.close()

    # -- called by the protocols -----------------------------------------------------------

    def opened(self, conn: GuardedHttpProtocol) -> None:
        self._open.add(conn)
        self.metrics.connections.set(len(self._open))

    def closed(self, conn: GuardedHttpProtocol) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._release()
        self.metrics.connections.set(len(self._open))

    def refused(self, reason: str) -> None:
        self.metrics.connection_closed(reason)

    # -- accepting -------------------------------------------------------------------------

    async def _accept(self, sock: socket.socket) -> None:
        """Accept connections on ``sock`` for the server's life: on each wake-up, every
        connection waiting in the kernel's backlog (up to ``ACCEPT_BATCH``), each connected on a
        task of its own. One accept per wake-up, each connected before the next accept, let a
        busy event loop (streaming tokens) admit one connection per iteration: new requests
        then waited in the backlog for most of their life (bench/hostcost.py at 256 streams:
        ~1.4 s of a ~1.6 s request cycle) and the engine's steps were a tenth as full as the
        streams allowed."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as err:  # e.g. EMFILE from files opened elsewhere: back off, retry
                log.warning("accept failed: %s", err)
                await asyncio.sleep(0.1)
                continue
            accepted = 1
            while conn is not None:
                self._reserved += 1
                await self._make_room()
                task = asyncio.ensure_future(self._connect(loop, conn))
                self._connecting.add(task)  # a strong reference until it is done
                task.add_done_callback(self._connecting.discard)
                conn = _accept_waiting(sock) if accepted < ACCEPT_BATCH else None
                accepted += 1

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        """Serve an accepted connection (its slot is reserved already)."""
        made: list[GuardedHttpProtocol] = []
        try:
            await loop.connect_accepted_socket(functools.partial(_append, made, self), conn)
        except OSError as err:  # the client is already gone
            log.debug("dropped a connection before serving it: %s", err)
            conn.close()
            if not made or made[0].transport is None:  # never opened: closed() won't run
                self._release()

    async def _make_room(self) -> None:
        """Return once the connection just accepted fits under the cap."""
        while self._reserved > self.limits.max_connections:
            self._room.clear()
            victim = min(
                (c for c in self._open if c.evictable), key=lambda c: c.idle_since, default=None
            )
            if victim is not None:
                self.refused("evicted")
                victim.evict()
            await self._room.wait()  # a close (the victim's, or any other) frees a slot

    def _release(self) -> None:
        self._reserved -= 1
        self._room.set()


def _append(made: list[GuardedHttpProtocol], listener: Listener) -> GuardedHttpProtocol:
    made.append(listener.make_protocol(listener))
    return made[-1]


def _accept_waiting(sock: socket.socket) -> socket.socket | None:
    """A connection waiting in ``sock``'s backlog, accepted without blocking; None when none
    is (or the accept failed: the accept loop's next wait retries and reports it)."""
    try:
        conn, _ = sock.accept()
    except OSError:  # BlockingIOError (nothing waiting), or EMFILE and the like
        return None
    conn.setblocking(False)
    return conn
