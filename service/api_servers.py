"""More HTTP front ends: ``--api-servers N`` runs N API-server processes on one engine core.

The server's first process (front end 0) binds the listening sockets, spawns the engine core and,
once the core is ready, spawns front ends 1 .. N-1 (``ApiServers.start``). Each is a whole server
(``service.server.serve``: the guarded transport with its own connection cap, the app, the drain)
accepting on the same sockets, with an engine that joins the running core
(``CoreClient.attach``): its requests go to the core, the core sends each its own tokens and every
front end the step's stats, and one shared count keeps admission exact across them
(``service/engine/admission.py``). Metrics are summed over the processes (prometheus_client's
multiprocess files); step metrics are counted by front end 0 alone.

Lifecycle: a SIGTERM (or Ctrl-C) to the first process drains it and is passed on to the others,
which drain too; the first process waits for them to exit before it stops the core. A front end
that dies unexpectedly stops the whole server (exit 4, as a dead core does: its supervisor
restarts it), and front ends 1 .. N-1 end themselves when the core or the first process is gone.
"""

from __future__ import annotations

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
    status = serve(settings, spec.sockets, spec.limits, engine=engine)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # no interpreter teardown under torch's threads: the work is done


class ApiServers:
    """Front ends 1 .. N-1, seen from the first process: spawned once its core is ready, told to
    drain with it, waited for before the core stops, and watched: one that exits on its own ends
    the server."""

    def __init__(self, settings: Settings, sockets: list[socket.socket],
                 limits: TransportLimits) -> None:
        self.settings = settings
        self.sockets = sockets
        self.limits = limits
        self.processes: list = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, engine) -> None:
        """Spawn front ends 1 .. N-1 on ``engine``'s core (a started ``CoreClient``, front 0)."""
        context = multiprocessing.get_context("spawn")
        for front in range(1, self.settings.api_servers):
            spec = ApiServerSpec(self.settings, self.sockets, self.limits, engine.seat(front))
            process = context.Process(target=run_api_server, args=(spec,),
                                      name=f"gptserve-api-server-{front}")
            process.start()
            self.processes.append(process)
        log.info("%d API-server processes share the listening socket (pids %d, %s)",
                 self.settings.api_servers, os.getpid(),
                 ", ".join(str(p.pid) for p in self.processes))
        self._watcher = threading.Thread(target=self._watch, args=(engine,),
                                         name="api-server-watch", daemon=True)
        self._watcher.start()

    def _watch(self, engine) -> None:
        live = {p.sentinel: p for p in self.processes}
        while live and not self._stopping.is_set():
            for sentinel in multiprocessing.connection.wait(list(live), timeout=0.5):
                process = live.pop(sentinel)
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

    def drain(self) -> None:
        """Pass a drain on: SIGTERM to every live front end (each drains its own requests)."""
        self._stopping.set()
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        """Drain the front ends and wait up to ``timeout`` s (+ ``STOP_GRACE``) for them to
        exit; kill the ones still running then."""
        self._stopping.set()
        self.drain()
        deadline = time.monotonic() + timeout + STOP_GRACE
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("API server %s did not exit in time; killing it", process.name)
                process.kill()
                process.join()
        if self.settings.api_servers > 1 and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            for process in self.processes:  # their connection gauges stop counting
                multiprocess.mark_process_dead(process.pid)


def _status(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
