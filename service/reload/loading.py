"""Blocking work (a checkpoint load, an engine's shutdown) run off the event loop with a deadline.

Not asyncio's default executor: its threads are joined when the loop closes, so one load stuck in
a read would keep the process from exiting after SIGTERM. Each job gets its own daemon thread;
the awaiting coroutine gives up at the deadline (or when cancelled at shutdown) and the thread,
if it never ends, dies with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from model.checkpoint import CheckpointError

T = TypeVar("T")
THREAD_PREFIX = "gptserve job: "  # names every DaemonJob's thread (see jobs_still_running)


class LoadTimeout(CheckpointError):
    """The job did not finish by its deadline; it was abandoned, not stopped."""


class LoadBusy(CheckpointError):
    """An earlier load passed its deadline and is still running: no second one starts."""


class DaemonJob(Generic[T]):
    """Owns one blocking call running in its own daemon thread, awaited from the event loop."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[T] = self._loop.create_future()
        self.thread = threading.Thread(
            target=self._run, args=(fn,), name=THREAD_PREFIX + name, daemon=True
        )
        self.thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            outcome = (self._done.set_result, fn())
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (self._done.set_exception, err)
        with contextlib.suppress(RuntimeError):  # the loop has closed: the process is exiting
            self._loop.call_soon_threadsafe(self._deliver, *outcome)

    def _deliver(self, setter: Callable, value) -> None:
        if not self._done.done():  # abandoned (timed out or cancelled): nobody wants it any more
            setter(value)

    async def wait(self, timeout: float) -> T:
        """The call's result or exception, or ``LoadTimeout`` after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self._done, timeout)
        except TimeoutError:
            raise LoadTimeout(
                f"{self.name} did not finish within {timeout:g}s and was abandoned"
            ) from None


def jobs_still_running() -> list[str]:
    """What abandoned jobs are still running (their threads are named ``THREAD_PREFIX ...``).

    The process must not finalize the interpreter under one: a daemon thread inside torch while
    Python tears down can crash the exit (seen as SIGSEGV). ``python -m service`` exits with
    ``os._exit`` when this is not empty.
    """
    return [
        t.name.removeprefix(THREAD_PREFIX)
        for t in threading.enumerate()
        if t.daemon and t.name.startswith(THREAD_PREFIX) and t.is_alive()
    ]


async def in_daemon_thread(fn: Callable[[], T], *, name: str, timeout: float) -> T:
    """Run ``fn()`` in a new daemon thread; its result, its exception, or ``LoadTimeout``."""
    return await DaemonJob(fn, name).wait(timeout)


class SupervisedLoads:
    """Owns the one checkpoint load that may run at a time and remembers one that overran.

    A load abandoned at its deadline may still hold memory and a file; while it runs, another
    load is refused at once (``LoadBusy``) instead of piling up threads.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._overrun: DaemonJob | None = None

    async def run(self, fn: Callable[[], T], what: str) -> T:
        if self._overrun is not None and self._overrun.thread.is_alive():
            raise LoadBusy(
                f"{self._overrun.name} passed its {self.timeout:g}s deadline and has not ended; "
                "no other load starts until it does (restart the server if it never ends)"
            )
        job = DaemonJob(fn, f"loading {what}")
        try:
            return await job.wait(self.timeout)
        except LoadTimeout:
            self._overrun = job
            raise
