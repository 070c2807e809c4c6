"""What the running app holds: the live engine, readiness, and the requests in flight.

``ServerState`` is the one place the rest of the app reaches the engine through
(``state.engine``), so swapping engines (live checkpoint reload) is a local change: replace it with
``swap_engine``. It also owns draining: after SIGTERM, readiness turns false, new work is refused,
and in-flight requests get ``shutdown_timeout`` seconds before they are aborted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from service.metrics import Metrics
from service.reload.snapshot import system_fingerprint
from service.settings import Settings

if TYPE_CHECKING:
    from service.engine import Engine

log = logging.getLogger("service")


class ServerState:
    """Owns the engine reference, the draining flag and the set of in-flight engine requests."""

    def __init__(self, settings: Settings, metrics: Metrics, engine: Engine | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._engine = engine
        self.draining = False
        self.load_error: Exception | None = None  # the checkpoint failed to load: stop serving
        self.started = int(time.time())
        self.api_servers = None  # front ends 1 .. N-1 when this is front end 0 of several
        self._inflight: dict[str, Any] = {}  # engine request id -> engine that runs it
        self._idle = asyncio.Event()
        self._idle.set()
        # each engine's system_fingerprint, computed once per loaded model (JSON + SHA-1)
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("no engine is loaded yet")
        return self._engine

    @property
    def has_engine(self) -> bool:
        return self._engine is not None

    def swap_engine(self, engine: Engine) -> Engine | None:
        """Make ``engine`` serve new requests; returns the previous one (requests already running
        keep the engine they started on)."""
        old, self._engine = self._engine, engine
        return old

    def fingerprint(self, engine: Engine) -> str | None:
        """The checkpoint ``engine`` serves, as OpenAI's ``system_fingerprint``."""
        if engine not in self._fingerprints:
            self._fingerprints[engine] = system_fingerprint(engine)
        return self._fingerprints[engine]

    @property
    def fatal_error(self) -> BaseException | None:
        """Why the server must stop: its engine's core process died (None: it did not)."""
        engine = self._engine
        if engine is None or not engine.fatal_on_failure:
            return None
        return engine.error

    @property
    def ready(self) -> bool:
        return self._engine is not None and bool(self._engine.ready) and not self.draining

    def not_ready_reason(self) -> str:
        """Why ``ready`` is False, for a 503's message: draining, a dead engine, or loading."""
        if self.draining:
            return "the server is draining (shutting down or restarting)"
        if self._engine is not None and self._engine.error is not None:
            return f"the engine failed: {self._engine.error!r}"
        return "the server is loading its model"

    def track(self, request_id: str, engine: Engine) -> None:
        self._inflight[request_id] = engine
        self._idle.clear()

    def untrack(self, request_id: str) -> None:
        self._inflight.pop(request_id, None)
        if not self._inflight:
            self._idle.set()

    def num_inflight_on(self, engine: Engine) -> int:
        """Requests in flight on ``engine`` (a live reload retires an engine when this is 0)."""
        return sum(1 for e in self._inflight.values() if e is engine)

    async def drain(self, timeout: float) -> None:
        """Refuse new work, wait up to ``timeout`` s for in-flight requests, abort the rest."""
        self.draining = True
        if self.api_servers is not None:  # the other front ends drain their own requests
            self.api_servers.drain()
        log.info(
            "draining: %d request(s) in flight, waiting up to %.1fs", len(self._inflight), timeout
        )
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("shutdown timeout: aborting %d request(s)", len(self._inflight))
            for request_id, engine in list(self._inflight.items()):
                engine.abort(request_id)
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except TimeoutError:
                log.error("%d request(s) did not end after abort", len(self._inflight))
        log.info("drained")


async def server_state(request: Request) -> ServerState:
    """The app's ``ServerState`` (FastAPI dependency)."""
    return request.app.state.server
