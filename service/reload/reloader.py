"""Live checkpoint reload: load a new checkpoint beside the running model, then switch to it.

The trainer writes a checkpoint folder atomically (one ``renameat2`` exchange swaps the whole
folder), so a change of the folder's identity *is* the signal that a complete new checkpoint is
there. With ``--watch`` the server polls that identity; ``POST /admin/reload`` asks for the same
thing by hand. A reload:

1. reads the checkpoint through an open handle on the folder (``/proc/self/fd/N``), so config and
   weights come from the same folder even if the trainer swaps in yet another one mid-read, and
   gives up (to retry on the next poll) if the folder changed while it was being read; the read
   runs in its own daemon thread with a deadline (``--load-timeout``) and a memory budget that
   counts the engine it will need beside the one serving;
2. refuses a bad checkpoint (unreadable, hostile, too big, wrong shapes, non-finite weights,
   another tokenizer, or anything no check foresaw) with a log line and
   ``gptserve_model_reloads_total{result="failed"}``; the old model keeps serving;
3. builds and starts a second ``Engine``, waits for its first step, and switches the app's current
   engine (``ServerState.swap_engine``): requests in flight finish on the old weights, new ones get
   the new weights;
4. retires the old engine once its last in-flight request has ended.

The watcher is supervised: whatever a look at the folder or a reload raises is logged and counted,
and the watcher keeps watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from model.checkpoint import Budget, Checkpoint, CheckpointError
from model.checkpoint.budget import host_budget
from model.checkpoint.naming import run_checkpoint
from service.reload.loading import LoadBusy, SupervisedLoads, in_daemon_thread
from service.reload.snapshot import (
    Fingerprint,
    FolderChanged,
    ModelInfo,
    check_compatible,
    folder_swapped,
    load_consistent,
)

if TYPE_CHECKING:
    from service.api.state import ServerState
    from service.engine import Engine

log = logging.getLogger("service.reload")


@dataclass(frozen=True)
class ReloadConfig:
    """How the server follows its checkpoint: watching on or off, and the timings."""

    watch: bool = False
    interval: float = 2.0  # seconds between two looks at the checkpoint folder
    load_timeout: float = 300.0  # seconds a checkpoint load may take before it is abandoned
    ready_timeout: float = 120.0  # seconds a new engine gets to take its first step
    retire_timeout: float = 600.0  # seconds the old engine waits for its last request

    def __post_init__(self) -> None:
        if min(self.interval, self.load_timeout, self.ready_timeout, self.retire_timeout) <= 0:
            raise ValueError("reload interval and timeouts must be > 0")


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: ``reloaded``, or ``unchanged`` when the live checkpoint is the same."""

    status: str
    model: ModelInfo


class ReloadError(Exception):
    """The new checkpoint was refused; the message says why. The old model keeps serving.

    ``status`` is the HTTP status ``POST /admin/reload`` answers with (409 while an overrunning
    load still holds the loader, else 400), ``code`` the error envelope's code.
    """

    def __init__(self, message: str, status: int = 400, code: str = "invalid_checkpoint") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class OtherFrontEnds(Protocol):
    """The other API-server processes of ``--api-servers N``, as a reload sees them."""

    async def switch(self, engine: Engine, timeout: float) -> None:
        """Have every other front end serve ``engine``'s core for new requests."""

    async def retired(self, engine: Engine, deadline: float) -> None:
        """Return once no other front end has a request left on ``engine``'s core (or at
        ``deadline``, a ``time.monotonic()`` value)."""


class Reloader:
    """Owns the live ``ModelInfo``, the reload lock, the watch task and the retiring engines.

    ``build_engine(checkpoint)`` returns a started ``Engine`` (the app factory's recipe);
    ``budget(live_engine)`` the memory check a new checkpoint must pass beside ``live_engine``;
    ``on_model(info)`` is told which checkpoint is live, ``on_reload(ok)`` how each reload ended.
    """

    def __init__(
        self,
        state: ServerState,
        path: Path,
        config: ReloadConfig,
        build_engine: Callable[[Checkpoint], Engine],
        on_model: Callable[[ModelInfo], None] = lambda info: None,
        on_reload: Callable[[bool], None] = lambda ok: None,
        budget: Callable[[Engine | None], Budget] = lambda live: host_budget,
    ) -> None:
        self.others: OtherFrontEnds | None = None  # --api-servers N: front ends 1 .. N-1
        self.state = state
        self.path = run_checkpoint(path)  # a run folder: its best/ (else latest/) is watched
        self.config = config
        self._build_engine = build_engine
        self._on_model = on_model
        self._on_reload = on_reload
        self._budget = budget
        self._loads = SupervisedLoads(config.load_timeout)
        self._lock = asyncio.Lock()
        self._live: Fingerprint | None = None
        self._refused: Fingerprint | None = None  # a bad checkpoint is reported once, not per poll
        self._watch_error: str | None = None  # likewise a folder that cannot be looked at
        self._tasks: set[asyncio.Task] = set()
        self._retiring: set[Engine] = set()
        self.info: ModelInfo | None = None

    def adopt(self, checkpoint: Checkpoint, fingerprint: Fingerprint | None) -> ModelInfo:
        """Record the checkpoint the app started with as the live one."""
        self._live = fingerprint
        self.info = ModelInfo.of(checkpoint, self.path)
        self._on_model(self.info)
        return self.info

    def start(self, engine: Engine) -> None:
        """Adopt the engine the app started with as the live model; start watching if asked.

        Its fingerprint is taken now, after its load: a checkpoint swapped in between is picked up
        by the next swap, never half-read.
        """
        checkpoint = getattr(engine, "checkpoint", None)
        if isinstance(checkpoint, Checkpoint):
            try:
                fingerprint = Fingerprint.of(self.path)
            except CheckpointError:
                fingerprint = None  # the watcher reports it on its first look
            self.adopt(checkpoint, fingerprint)
        if self.config.watch:
            self._spawn(self._watch())

    async def stop(self) -> None:
        """Stop watching; shut down engines still retiring (the app shuts the live one)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for engine in list(self._retiring):
            await self._shutdown(engine, 1.0)
        self._retiring.clear()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        log.info("watching %s for new checkpoints every %.1fs", self.path, self.config.interval)
        seen: Fingerprint | None = None
        while True:
            await asyncio.sleep(self.config.interval)
            try:
                seen = await self._look(seen)
                self._watch_error = None
            except asyncio.CancelledError:
                raise
            except ReloadError:
                pass  # logged and counted in reload(); the old model keeps serving
            except Exception as err:  # noqa: BLE001 - nothing a checkpoint does may end the watcher
                why = str(err) if isinstance(err, CheckpointError) else f"{type(err).__name__}: {err}"
                if why != self._watch_error:  # once per distinct problem, not once per poll
                    self._watch_error = why
                    self._on_reload(False)
                    log.error("cannot look at %s, still watching: %s", self.path, why)

    async def _look(self, seen: Fingerprint | None) -> Fingerprint | None:
        now = Fingerprint.of(self.path)
        # A new folder (the trainer's atomic swap) is read at once; files changed in place
        # are read only once two looks in a row agree, giving such a writer time to finish.
        stable = now == seen
        if now is None or now in (self._live, self._refused):
            return now
        if stable or folder_swapped(now, self._live):
            await self.reload()
        return now

    async def reload(self, path: Path | None = None) -> ReloadOutcome:
        """Load ``path`` (default: the watched checkpoint) and switch to it; see the module doc."""
        async with self._lock:
            if self.state.draining:
                raise ReloadError("the server is shutting down", 503, "not_ready")
            target = run_checkpoint(path) if path is not None else self.path
            try:
                return await self._reload(target)
            except (ReloadError, asyncio.CancelledError):
                raise
            except Exception as err:  # noqa: BLE001 - an unforeseen failure is still one refusal
                log.warning("unexpected error reloading %s", target, exc_info=True)
                fingerprint = None
                with contextlib.suppress(CheckpointError):
                    fingerprint = Fingerprint.of(target)
                self._refuse(fingerprint, f"{target}: {type(err).__name__}: {err}")

    async def _reload(self, target: Path) -> ReloadOutcome:
        live = self.state.engine if self.state.has_engine else None
        budget = self._budget(live)
        fingerprint = None
        for _attempt in range(3):
            try:
                fingerprint = Fingerprint.of(target)
                if target == self.path and fingerprint == self._live and self.info is not None:
                    return ReloadOutcome("unchanged", self.info)
                load = functools.partial(load_consistent, target, budget)
                snapshot = await self._loads.run(load, str(target))
                break
            except FolderChanged as err:
                log.info("checkpoint %s changed while loading (%s); reading it again", target, err)
                await asyncio.sleep(0.2)
            except LoadBusy as err:
                self._refuse(None, str(err), status=409, code="reload_in_progress")
            except CheckpointError as err:
                self._refuse(fingerprint, str(err))
        else:
            self._refuse(None, f"{target} kept changing while it was read")
        return await self._switch(snapshot.checkpoint, snapshot.fingerprint, target)

    def _refuse(
        self, fingerprint: Fingerprint | None, why: str, status: int = 400,
        code: str = "invalid_checkpoint",
    ) -> None:  # fmt: skip
        self._refused = fingerprint
        self._on_reload(False)
        log.error("checkpoint refused, the old model keeps serving: %s", why)
        raise ReloadError(why, status, code)

    async def _switch(
        self, checkpoint: Checkpoint, fingerprint: Fingerprint | None, target: Path
    ) -> ReloadOutcome:
        old = self.state.engine if self.state.has_engine else None
        live_spec = old.tokenizer.spec() if old is not None else None
        try:
            check_compatible(checkpoint, live_spec)
            engine = await in_daemon_thread(
                functools.partial(self._build_engine, checkpoint),
                name=f"starting an engine for {target}",
                timeout=self.config.ready_timeout,
            )
        except (CheckpointError, ValueError, RuntimeError) as err:
            self._refuse(fingerprint, str(err))
        if not await self._wait_ready(engine):
            await self._shutdown(engine, 0.0)
            self._refuse(
                fingerprint,
                f"{target}: the new engine took no step within {self.config.ready_timeout:.0f}s",
            )
        self.path, self._live, self._refused = target, fingerprint, None
        previous = self.state.swap_engine(engine)
        if self.others is not None:  # every front end serves the new model before we answer
            await self.others.switch(engine, self.config.ready_timeout)
        self.info = ModelInfo.of(checkpoint, target)
        self._on_model(self.info)
        self._on_reload(True)
        log.info(
            "now serving %s (iteration %s, val_loss %s)",
            target,
            self.info.iteration,
            self.info.val_loss,
        )
        if previous is not None:
            self._retiring.add(previous)
            self._spawn(self._retire(previous))
        return ReloadOutcome("reloaded", self.info)

    async def _wait_ready(self, engine: Engine) -> bool:
        deadline = time.monotonic() + self.config.ready_timeout
        while not engine.ready:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _retire(self, engine: Engine) -> None:
        """Shut ``engine`` down once no request in flight runs on it (bounded by retire_timeout)."""
        deadline = time.monotonic() + self.config.retire_timeout
        while self.state.num_inflight_on(engine) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.others is not None:  # their requests on the old core end first, too
            await self.others.retired(engine, deadline)
        await self._shutdown(engine, 5.0)
        self._retiring.discard(engine)
        log.info("retired the previous engine")

    async def _shutdown(self, engine: Engine, grace: float) -> None:
        """``engine.shutdown(grace)`` in a daemon thread, given up on a few seconds later."""
        try:
            await in_daemon_thread(
                functools.partial(engine.shutdown, grace), name="engine shutdown",
                timeout=grace + 5.0,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - past its deadline the daemon thread dies with us
            log.error("shutting down an engine failed: %s", err)


def server_reloader(state: ServerState, engine_config: Callable[[Any], Any],
                    make_engine: Callable[[Any, Checkpoint], Engine]) -> Reloader:
    """The app's reloader: engines built like the first one, results reported to the metrics.

    ``engine_config(settings)`` is the app factory's recipe for the ``EngineConfig``,
    ``make_engine(settings, checkpoint)`` its recipe for an engine (in-process or a core process).
    """
    from service.reload.budget import serving_budget

    settings = state.settings

    try:  # the server's loop: an engine-core client started for it reads its core there
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def build_engine(checkpoint: Checkpoint) -> Engine:
        engine = make_engine(settings, checkpoint)
        state.metrics.attach(engine)
        engine.start(loop)
        return engine

    def on_model(info: ModelInfo) -> None:
        state.metrics.set_model(
            str(info.path), info.source_format, info.iteration, info.val_loss, info.loaded_at
        )

    config = ReloadConfig(
        watch=settings.watch,
        interval=settings.watch_interval,
        load_timeout=settings.load_timeout,
        retire_timeout=settings.request_timeout or ReloadConfig.retire_timeout,
    )
    return Reloader(
        state,
        settings.checkpoint,
        config,
        build_engine,
        on_model,
        state.metrics.reload_result,
        budget=lambda live: serving_budget(engine_config(settings), live),
    )
