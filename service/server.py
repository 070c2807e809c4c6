"""The server process: uvicorn runs the app on our listener and drains it on SIGTERM.

``serve(settings, sockets, limits)`` runs until a signal drains the server. uvicorn supplies the
HTTP protocol (guarded by ``service.transport``), the lifespan and the signal handling; the
listening sockets (bound by the caller before anything slow) and the connection cap are ours.
SIGTERM (or the first Ctrl-C) drains: readiness turns 503, new requests get 503, in-flight
requests get ``--shutdown-timeout`` seconds to finish, then the process exits 0. A second Ctrl-C
forces exit. If the engine-core process dies, every live stream ends with an error, /health and
/ready say why for a second, and the server exits 4 (its supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

import uvicorn

from service.settings import CLOSE_GRACE, Settings
from service.transport.limits import TransportLimits
from service.transport.listener import Listener
from service.transport.protocol import GuardedHttpProtocol

log = logging.getLogger("service")
FAILURE_HOLD_TICKS = 10  # uvicorn ticks (0.1 s) a server with a dead engine core still answers


class DrainingServer(uvicorn.Server):
    """A uvicorn server that accepts through our ``Listener`` and drains the app on exit."""

    def __init__(
        self,
        config: uvicorn.Config,
        state,
        sockets: list[socket.socket],
        limits: TransportLimits,
    ) -> None:
        super().__init__(config)
        self._state = state
        self._sockets = sockets
        self._limits = limits
        self._listener: Listener | None = None
        self._drain_task: asyncio.Task | None = None
        self._failed_at: int | None = None  # the tick that saw the engine core dead

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the lifespan only: the listener accepts, not asyncio

        def make_protocol(listener: Listener) -> GuardedHttpProtocol:
            return GuardedHttpProtocol(
                self.config, self.server_state, self.lifespan.state, listener=listener
            )

        self._listener = Listener(self._sockets, make_protocol, self._limits, self._state.metrics)
        self._listener.start()
        for sock in self._sockets:
            host, port = sock.getsockname()[:2]
            log.info(
                "listening on http://%s:%d (at most %d connections)",
                f"[{host}]" if ":" in host else host,
                port,
                self._limits.max_connections,
            )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._listener is not None:
            await self._listener.stop()
        await super().shutdown()

    def handle_exit(self, sig: int, frame) -> None:  # runs in the main (event loop) thread
        if self._drain_task is not None:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now, without waiting
                self.should_exit = self.force_exit = True
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        loop = asyncio.get_running_loop()
        self._drain_task = loop.create_task(self._drain())

    async def on_tick(self, counter: int) -> bool:
        if self._state.load_error is not None:  # the background load failed: stop, exit 2
            self.should_exit = True
        failed = self._state.fatal_error
        if failed is not None:  # the engine core died: every stream has ended; exit 4
            if self._failed_at is None:
                self._failed_at = counter
                log.error("stopping the server: %s", failed)
            # a few ticks first, so probes of /health and /ready see why (0.1 s a tick)
            if counter - self._failed_at >= FAILURE_HOLD_TICKS:
                self.should_exit = True
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        try:
            await self._state.drain(self._state.settings.shutdown_timeout)
        finally:
            self.should_exit = True  # now uvicorn closes the connections and ends the lifespan


def build_server(
    app, sockets: list[socket.socket], limits: TransportLimits
) -> DrainingServer:
    """The production server for ``app`` (made by ``create_app``) on listening ``sockets``: the
    uvicorn config, the guarded protocol, the connection cap and the drain. ``serve`` runs it;
    the tests' live servers are built here too, so they exercise the same transport."""
    state = app.state.server
    config = uvicorn.Config(
        app,
        http="httptools",  # the protocol GuardedHttpProtocol extends
        ws="none",
        lifespan="on",
        log_config=None,  # our handler and format (service.logs) for uvicorn's records too
        log_level=state.settings.log_level,
        access_log=False,  # service.api.access logs each request instead
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  (float is fine)
        timeout_graceful_shutdown=CLOSE_GRACE,  # after the drain (--shutdown-timeout)
    )
    return DrainingServer(config, state, sockets, limits)


def serve(
    settings: Settings, sockets: list[socket.socket], limits: TransportLimits, engine=None
) -> int:
    """Serve on ``sockets`` until a signal drains the server (``engine`` None: load
    ``settings.checkpoint`` in the background while already answering /health and /ready).
    Returns the exit status."""
    from service.app import create_app

    api_servers = None
    if settings.api_servers > 1 and engine is None:  # front end 0 of several
        from service.api_servers import ApiServers

        api_servers = ApiServers(settings, sockets, limits)
    app = create_app(settings, engine, api_servers)
    state = app.state.server
    build_server(app, sockets, limits).run()
    if state.load_error is not None:
        print(f"gptserve: cannot load checkpoint: {state.load_error}", file=sys.stderr)
        return 2
    if state.fatal_error is not None:
        print(f"gptserve: {state.fatal_error}", file=sys.stderr)
        return 4
    return 0
