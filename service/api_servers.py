"""More HTTP front ends: ``--api-servers N`` runs N API-server processes on one engine core.

The server's first process (front end 0) binds the listening sockets, spawns the engine core and,
once the core is ready, spawns front ends 1 .. N-1 (``ApiServers.start``). Each is a whole server
(``service.server.serve``: the guarded transport with its own connection cap, the app, the drain)
accepting on the same sockets, with an engine that joins the running core
(``CoreClient.attach``): its requests go to the core, the core sends each its own tokens and every
front end the step's stats, and one shared count keeps admission exact across them
(``service/engine/admission.py``). Metrics are summed over the processes (prometheus_client's
multiprocess files); the engine cores' own counts lie in one file per core in the same folder,
read by whichever process a scrape reaches (``service/metrics.py``).

Lifecycle: a SIGTERM (or Ctrl-C) to the first process drains it and is passed on to the others,
which drain too; the first process waits for them to exit before it stops the core. A front end
that dies unexpectedly stops the whole server (exit 4, as a dead core does: its supervisor
restarts it), and front ends 1 .. N-1 end themselves when the core or the first process is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from service.settings import Settings
from service.transport.limits import TransportLimits

log = logging.getLogger("service")
STOP_GRACE = 10.0  # seconds past the drain a front end gets to exit before it is killed


@dataclass(frozen=True)
class ApiServerSpec:
    """Everything API-server process ``seat.front`` needs (pickled to it at spawn; the sockets
    travel as duplicated descriptors)."""

    settings: Settings
    sockets: list[socket.socket]
    limits: TransportLimits
    seat: object  # service.engine.client.Seat (imported in the child, not at import here)
    link: Connection  # this front end's end of its pipe to the first process


def run_api_server(spec: ApiServerSpec) -> None:
    """The entry point of front ends 1 .. N-1 (``multiprocessing`` spawn target)."""
    from service.engine.client import CoreClient
    from service.logs import configure_logging
    from service.server import serve

    settings = spec.settings
    configure_logging(settings.log_level, settings.log_format)
    try:
        engine = CoreClient.attach(spec.seat)
    except Exception as err:  # noqa: BLE001 - reported; the first process stops the server
        log.error("API server %d could not join the engine core: %s", spec.seat.front, err)
        sys.exit(4)
    log.info("API server %d (pid %d) serving", spec.seat.front, os.getpid())
    status = serve(settings, spec.sockets, spec.limits, engine=engine,
                   follower=Follower(spec.link))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # no interpreter teardown under torch's threads: the work is done


class ApiServers:
    """Front ends 1 .. N-1, seen from the first process: spawned once its core is ready, told to
    drain with it, waited for before the core stops, switched to a new core by a live reload
    (``OtherFrontEnds``), and watched: one that exits on its own ends the server.

    Each front end has a pipe to this process: it asks for reloads through it (``POST
    /admin/reload`` may reach any front end; the first process's reloader does the work), and
    says when it serves a new core and when its last request on the old one has ended."""

    def __init__(self, settings: Settings, sockets: list[socket.socket],
                 limits: TransportLimits) -> None:
        self.settings = settings
        self.sockets = sockets
        self.limits = limits
        self.processes: list = []
        self._links: list[Connection] = []
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reloader = None
        self._heard: dict[tuple[str, str], set[int]] = {}  # (event, core folder) -> front ends
        self._changed: asyncio.Condition | None = None

    def start(self, engine, reloader) -> None:
        """Spawn front ends 1 .. N-1 on ``engine``'s core (a started ``CoreClient``, front 0);
        their reload requests go to ``reloader``. Called on the event loop."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        self._reloader = reloader
        reloader.others = self
        context = multiprocessing.get_context("spawn")
        # the others never watch: the first process does, and switches them all
        settings = dataclasses.replace(self.settings, watch=False)
        for front in range(1, self.settings.api_servers):
            mine, theirs = context.Pipe()
            spec = ApiServerSpec(settings, self.sockets, self.limits, engine.seat(front), theirs)
            process = context.Process(target=run_api_server, args=(spec,),
                                      name=f"gptserve-api-server-{front}")
            process.start()
            theirs.close()
            self.processes.append(process)
            self._links.append(mine)
        log.info("%d API-server processes share the listening socket (pids %d, %s)",
                 self.settings.api_servers, os.getpid(),
                 ", ".join(str(p.pid) for p in self.processes))
        self._watcher = threading.Thread(target=self._watch, args=(engine,),
                                         name="api-server-watch", daemon=True)
        self._watcher.start()

    # ---- the pipes -------------------------------------------------------------------------------

    def _watch(self, engine) -> None:
        """Reads every front end's pipe and notices a front end that exits."""
        live = {p.sentinel: p for p in self.processes}
        links = {link: front for front, link in enumerate(self._links, 1)}
        while live and not self._stopping.is_set():
            for ready in multiprocessing.connection.wait([*live, *links], timeout=0.5):
                if ready in links:
                    try:
                        self._heard_from(links[ready], ready.recv())
                    except (EOFError, OSError):
                        del links[ready]  # its process is exiting: the sentinel says how
                    continue
                process = live.pop(ready)
                process.join()
                if self._stopping.is_set():
                    return
                if process.exitcode == 0:  # drained on a signal of its own: the rest serve on
                    log.warning("API server %s (pid %d) drained and exited", process.name,
                                process.pid)
                    continue
                engine.fail(f"API server process {process.name} (pid {process.pid}) exited "
                            f"({_status(process.exitcode)})")
                return

    def _heard_from(self, front: int, message: tuple) -> None:
        kind = message[0]
        if kind == "reload":
            _kind, ask, path = message
            asyncio.run_coroutine_threadsafe(self._reload_for(front, ask, path), self._loop)
        elif kind in ("attached", "retired"):
            asyncio.run_coroutine_threadsafe(self._note(kind, message[1], front), self._loop)

    async def _note(self, kind: str, core: str, front: int) -> None:
        async with self._changed:
            self._heard.setdefault((kind, core), set()).add(front)
            self._changed.notify_all()

    async def _reload_for(self, front: int, ask: int, path: str | None) -> None:
        from service.reload import ReloadError

        try:
            outcome = await self._reloader.reload(None if path is None else Path(path))
            answer = ("reloaded", ask, outcome)
        except ReloadError as err:
            answer = ("refused", ask, (str(err), err.status, err.code))
        except Exception as err:  # noqa: BLE001 - the asking front end must hear back
            answer = ("refused", ask, (f"{type(err).__name__}: {err}", 500, "internal_error"))
        self._send(front, answer)

    def _send(self, front: int, message: tuple) -> None:
        with self._send_lock:
            try:
                self._links[front - 1].send(message)
            except (OSError, ValueError):  # that front end is gone: its exit is reported
                pass

    # ---- a live reload (OtherFrontEnds) ----------------------------------------------------------

    async def switch(self, engine, timeout: float) -> None:
        core = engine.core_folder
        fronts = self._running()
        for front in fronts:
            self._send(front, ("attach", engine.seat(front)))
        await self._wait("attached", core, fronts, time.monotonic() + timeout)

    async def retired(self, engine, deadline: float) -> None:
        await self._wait("retired", engine.core_folder, self._running(), deadline)
        self._heard.pop(("attached", engine.core_folder), None)
        self._heard.pop(("retired", engine.core_folder), None)

    def _running(self) -> set[int]:
        return {front for front, p in enumerate(self.processes, 1) if p.is_alive()}

    async def _wait(self, kind: str, core: str, fronts: set[int], deadline: float) -> None:
        async with self._changed:
            while not fronts <= self._heard.get((kind, core), set()) | {
                    f for f in fronts if not self.processes[f - 1].is_alive()}:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("API servers %s did not say %s in time", sorted(fronts), kind)
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    # ---- drain and stop --------------------------------------------------------------------------

    def drain(self) -> None:
        """Pass a drain on: SIGTERM to every live front end (each drains its own requests)."""
        self._stopping.set()
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        """Drain the front ends and wait up to ``timeout`` s (+ ``STOP_GRACE``) for them to
        exit; kill the ones still running then."""
        self.drain()
        deadline = time.monotonic() + timeout + STOP_GRACE
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("API server %s did not exit in time; killing it", process.name)
                process.kill()
                process.join()
        for link in self._links:
            link.close()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            for process in self.processes:  # their connection gauges stop counting
                multiprocess.mark_process_dead(process.pid)


class Follower:
    """Front end 1 .. N-1's side of its pipe: reloads asked here are done by the first process
    (``reload``), and a reload there switches this front end to the new core (``attach``): new
    requests go to it at once, the old core's last requests here finish first, then this front
    end leaves it."""

    def __init__(self, link: Connection) -> None:
        self.link = link
        self._asked: dict[int, asyncio.Future] = {}
        self._next = 0
        self._send_lock = threading.Lock()
        self.state = None
        self.reloader = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, state, reloader) -> None:
        """Listen on the pipe (called on the event loop once the app has its engine)."""
        self.state, self.reloader = state, reloader
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._listen, name="api-server-link", daemon=True).start()

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            with contextlib.suppress(OSError, ValueError):
                self.link.send(message)

    async def reload(self, path: Path | None):
        """``Reloader.reload``'s answer, from the first process's reloader."""
        from service.reload import ReloadError

        self._next += 1
        ask = self._next
        answer = self._asked[ask] = self._loop.create_future()
        self._send(("reload", ask, None if path is None else str(path)))
        try:
            kind, result = await answer
        finally:
            self._asked.pop(ask, None)
        if kind == "refused":
            message, status, code = result
            raise ReloadError(message, status, code)
        return result

    def _listen(self) -> None:
        while True:
            try:
                message = self.link.recv()
            except (EOFError, OSError):
                return  # the first process is gone: the engine notices and fails
            kind = message[0]
            if kind in ("reloaded", "refused"):
                _kind, ask, result = message
                self._loop.call_soon_threadsafe(self._answer, ask, kind, result)
            elif kind == "attach":
                self._attach(message[1])

    def _answer(self, ask: int, kind: str, result) -> None:
        future = self._asked.get(ask)
        if future is not None and not future.done():
            future.set_result((kind, result))

    def _attach(self, seat) -> None:
        from service.engine.client import CoreClient

        try:
            engine = CoreClient.attach(seat)
            engine.start(self._loop)  # its step messages are read on this front end's loop
        except Exception:  # noqa: BLE001 - cannot follow the reload: stop (the server exits 4)
            log.exception("API server could not join the new engine core; exiting")
            os._exit(4)
        asyncio.run_coroutine_threadsafe(self._switch(engine, seat.directory), self._loop)

    async def _switch(self, engine, core: str) -> None:
        previous = self.state.swap_engine(engine)
        self.reloader.path = engine.checkpoint.path  # as /v1/models names it on front end 0
        self.reloader.adopt(engine.checkpoint, None)
        self._send(("attached", core))
        while previous is not None and self.state.num_inflight_on(previous):
            await asyncio.sleep(0.1)
        if previous is not None:
            await asyncio.to_thread(previous.shutdown, 0.0)
            self._send(("retired", previous.core_folder))


def _status(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
