"""Run the server: ``python -m service`` (or ``gptserve``); ``--help`` lists every flag.

Loads the checkpoint (failing fast with a clear message), then serves it with uvicorn. SIGTERM
(or the first Ctrl-C) drains: readiness turns 503, new requests get 503, in-flight requests get
``--shutdown-timeout`` seconds to finish, then the process exits 0. A second Ctrl-C forces exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvicorn

from service.settings import Settings, parse_settings

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signals drain the app before stopping the listener."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self._state = state
        self._drain_task: asyncio.Task | None = None

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
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        try:
            await self._state.drain(self._state.settings.shutdown_timeout)
        finally:
            self.should_exit = True  # now uvicorn closes the listener and runs the lifespan end


def serve(settings: Settings, engine=None) -> int:
    """Serve until a signal drains the server (``engine`` None: load ``settings.checkpoint`` in
    the background while already answering /health and /ready). Returns the exit status."""
    from service.app import create_app

    app = create_app(settings, engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        access_log=settings.log_level == "debug",
    )
    state = app.state.server
    DrainingServer(config, state).run()
    if state.load_error is not None:
        print(f"gptserve: cannot load checkpoint: {state.load_error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from model.checkpoint.files import CheckpointError, checkpoint_kind

    try:  # fail fast on the common mistakes (missing, a symlink loop), before listening
        checkpoint_kind(settings.checkpoint)
    except CheckpointError as err:
        print(f"gptserve: cannot load checkpoint: {err}", file=sys.stderr)
        return 2
    status = serve(settings)
    from service.reload.loading import jobs_still_running

    if stuck := jobs_still_running():  # abandoned loads: never finalize the interpreter under them
        log.warning("exiting while still running: %s", "; ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
