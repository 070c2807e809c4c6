"""The front end's handle on an engine-core process: the API side of an engine, stepping nowhere.

``CoreClient(checkpoint, config)`` spawns the engine-core process (``core_process.run_core``),
which loads the same checkpoint, plans its slots and threads, warms up and says ``READY``; the
client is then an engine to the rest of the server: it admits requests exactly
(``EngineFront``), sends them and aborts to the core over ZMQ, and takes the core's one message
per step: its events go to the request streams, its stats to the stats listeners. Started on an
event loop (the server's), the client reads the core's socket on that loop (its fd registered
with ``add_reader``), so a step reaches the streams with no thread and no hand-over of the GIL;
started with no loop (scripts, tests), a receiver thread reads it and hands each step to its
streams' loops. The HTTP event loop and the model no longer share a GIL. The client tells the
core how many step messages its loop has handed over, so the core stays at most a few steps
ahead (``service/engine/pacing.py``).

If the core process dies (a crash, the OOM killer, a SIGKILL), every live request ends with an
``error`` finish, ``error`` says why, ``ready`` turns false and new requests are refused; the
server then exits non-zero so its supervisor restarts it (``fatal_on_failure``).
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import functools
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass

import zmq

from model.checkpoint import Checkpoint
from service.engine import wire
from service.engine.admission import SharedCount
from service.engine.config import EngineConfig
from service.engine.core_process import CoreSpec, run_core
from service.engine.counters import FILE_SUFFIX, CoreCounters
from service.engine.engine import (
    JOIN_GRACE,
    check_quantization,
    resolve_device,
    resolve_dtype,
)
from service.engine.front import EngineFront, running_loop
from service.engine.pacing import NOT_READING, ConsumedSteps
from service.engine.types import EngineError, EngineStoppedError, FinishReason, Request

log = logging.getLogger(__name__)
KILL_GRACE = 5.0  # seconds a stopped core gets to exit before it is killed
ATTACHED_POLL_MS = 200  # a front end that did not spawn the core checks it is alive this often


class CoreStartError(EngineError):
    """The engine-core process could not load, plan or warm up its model."""


class CoreDiedError(EngineError):
    """The engine-core process exited while serving."""


class CoreClient(EngineFront):
    """An engine whose core runs in its own process. Attributes as ``EngineFront``'s, plus
    ``checkpoint`` (its description: path, config, tokenizer, provenance; the weights live in
    the core only), ``pid`` (the core's) and ``fatal_on_failure`` (True: a dead core ends the
    server)."""

    fatal_on_failure = True

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None, *,
                 log_level: str = "info", log_format: str = "text", fronts: int = 1,
                 model_factory: str | None = None, profile: str | None = None,
                 counters_dir: str | None = None) -> None:
        """Spawn the core for ``checkpoint`` and be its front end 0. ``fronts`` > 1: the core
        serves that many API-server processes; the others join with ``attach(self.seat(i))``,
        and admission counts every front end's sequences against one capacity.
        ``counters_dir``: the folder for the core's ``CoreCounters`` file (every API-server
        process finds it there: ``service.metrics``); None: the core's own folder, and this
        front end reads it as ``counters``.
        ``model_factory`` (bench and tests only): "module:function" that the core calls for the
        checkpoint to serve instead of loading ``checkpoint.path``; ``profile`` (bench only): where
        the core writes a cProfile of its loop when it exits (``CoreSpec``)."""
        config = config or EngineConfig()
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        check_quantization(config.quantization, device)  # refused here, before any spawn
        self._dir = _socket_folder(fronts)  # 0700: ours alone
        self.front = 0
        self.fronts = fronts
        ConsumedSteps.create(_consumed_path(self._dir), fronts).close()
        counters = f"{counters_dir or self._dir}/{os.path.basename(self._dir)}{FILE_SUFFIX}"
        CoreCounters.create(counters)
        self.counters = CoreCounters.open(counters)  # (outlives the file: a retired core's)
        self._open_sockets(0)
        spec = CoreSpec(checkpoint.path, config, *_addresses(self._dir, fronts),
                        _consumed_path(self._dir), counters, log_level, log_format,
                        model_factory, parent=os.getpid(), profile=profile)
        self._process = multiprocessing.get_context("spawn").Process(
            target=run_core, args=(spec,), name="gptserve-engine-core", daemon=True)
        self._process.start()
        # a program that exits without ``shutdown``: multiprocessing's exit handler would
        # SIGTERM the core (which ignores it: its front end drains it) and then wait for it for
        # ever; this handler, registered after that one, runs before it and kills the core
        self._at_exit = functools.partial(_kill_at_exit, self._process, self._dir)
        atexit.register(self._at_exit)
        self._leader = os.getpid()
        try:
            info = self._wait_ready(checkpoint)
        except BaseException:
            self._close()
            raise
        self._init_front(checkpoint, config, device, dtype, info,
                         SharedCount(f"{self._dir}/admission") if fronts > 1 else None)

    @classmethod
    def attach(cls, seat: Seat) -> CoreClient:
        """Front end ``seat.front`` of a core another process spawned (``--api-servers N``)."""
        self = cls.__new__(cls)
        config = seat.config
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        self._dir = seat.directory
        self.front = seat.front
        self.fronts = seat.fronts
        self._process = None
        self._at_exit = None
        self._leader = seat.leader
        self._open_sockets(seat.front)
        try:
            info = self._wait_ready(seat.checkpoint)
        except BaseException:
            self._close()
            raise
        self._init_front(seat.checkpoint, config, device, dtype, info, seat.live)
        return self

    @property
    def core_folder(self) -> str:
        """The core's private socket folder: names the core among the ones a reload starts."""
        return self._dir

    def seat(self, front: int) -> Seat:
        """What API-server process ``front`` (1 .. fronts-1) needs to join this core."""
        return Seat(self._dir, front, self.fronts, self.config, self.checkpoint,
                    self._num_live, self._leader)

    def _open_sockets(self, front: int) -> None:
        """Connect to the core's input socket (it binds it: a front end that joins later has
        its requests queued until the connection is up) and bind this front end's output one
        (the core connects to it: what it sends before this front end is there waits)."""
        self._context = zmq.Context()
        self._inputs = self._context.socket(zmq.PUSH)
        self._outputs = self._context.socket(zmq.PULL)
        self._inputs.setsockopt(zmq.SNDHWM, 0)  # never block the event loop on a busy core
        self._inputs.setsockopt(zmq.LINGER, 0)
        self._outputs.setsockopt(zmq.LINGER, 0)
        inputs, outputs = _addresses(self._dir, self.fronts)
        self._inputs.connect(inputs)
        self._outputs.bind(outputs[front])
        self._codec = wire.OutputCodec()
        self._stopping = threading.Event()
        self._closed = False  # the sockets are closed (``_close``)
        self._inputs_lock = threading.Lock()
        # one shutdown at a time, and once: a reload's retiring engine can be shut down by its
        # retire task's thread and again by the reloader's stop (the first call may still be
        # running), and two threads closing one ZMQ socket abort the process in libzmq
        self._shutdown_lock = threading.Lock()
        self._shut = False
        # output pacing (service/engine/pacing.py): the step messages this front end's event
        # loop has handed to its streams, for the core to read; written while ``_reading``
        self._consumed = ConsumedSteps(_consumed_path(self._dir))
        self._received = 0  # step messages the receiver took
        self._reading = False
        self._pace_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the latest request's event loop

    def _init_front(self, checkpoint, config, device, dtype, info: wire.CoreInfo, live) -> None:
        super().__init__(checkpoint.tokenizer, checkpoint.config, config, device=device,
                         dtype=dtype, n_slots=info.n_slots, threads=info.threads,
                         window_shift=info.window_shift, live=live)
        # the front end keeps what describes the checkpoint, not its weights (the core has them)
        self.checkpoint = dataclasses.replace(checkpoint, model=None)
        self.pid = info.pid
        self._receiver: threading.Thread | None = None  # reads the core's outputs (no loop)
        self._reader: asyncio.AbstractEventLoop | None = None  # ...or this event loop reads them
        self._watching = False  # (on the reading loop) its readers are registered
        self._unwatched = threading.Event()  # the reading loop has let go of the socket
        self._timer: asyncio.TimerHandle | None = None
        self._failure: str | None = None  # what the core said in its FAILED message
        self._ended = threading.Event()  # the core's last message (or its exit) was taken

    def _poller(self) -> zmq.Poller:
        """Wakes for the core's next message or for its exit (a core this process spawned)."""
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        if self._process is not None:
            poller.register(self._process.sentinel, zmq.POLLIN)
        return poller

    def _gone(self) -> str | None:
        """Why the core cannot answer any more, for a front end that did not spawn it: the core
        or the server's first process is gone (checked every ``ATTACHED_POLL_MS``)."""
        if os.getppid() != self._leader:
            return f"the server's first process (pid {self._leader}) exited"
        if not _alive(self.pid):
            return f"the engine core process (pid {self.pid}) exited"
        return None

    def _wait_ready(self, checkpoint: Checkpoint) -> wire.CoreInfo:
        poller = self._poller()
        while True:
            ready = dict(poller.poll(None if self._process is not None else ATTACHED_POLL_MS))
            if self._outputs in ready:
                kind, payload = self._outputs.recv_multipart()
                if kind == wire.FAILED:
                    raise CoreStartError(payload.decode(errors="replace"))
                info = self._codec.decode_info(payload)
                if (info.vocab_size, info.block_size) != (checkpoint.tokenizer.vocab_size,
                                                          checkpoint.config.block_size):
                    raise CoreStartError(
                        f"{checkpoint.path} changed while it loaded (the core's model has "
                        f"vocabulary {info.vocab_size} and context {info.block_size})")
                return info
            if self._process is None:
                if os.getppid() != self._leader:
                    raise CoreStartError("the server's first process exited")
            elif self._process.sentinel in ready:
                self._process.join()
                raise CoreStartError(
                    f"the engine core process exited ({_exit_status(self._process.exitcode)}) "
                    "before it was ready")

    # ---- to the core ---------------------------------------------------------------------------

    def add_requests(self, requests: list[Request]):
        self._loop = asyncio.get_running_loop()  # where the streams' events are consumed
        return super().add_requests(requests)

    def _send(self, kind: bytes, payload) -> None:
        """Send an input (holding ``_cond``; and ``_inputs_lock``: none while ``_close`` closes
        the socket)."""
        with self._inputs_lock:
            if self._closed:
                raise EngineStoppedError("the engine core is not taking requests")
            try:
                self._inputs.send_multipart(wire.encode_input(kind, payload), zmq.NOBLOCK)
            except zmq.Again:  # no core connected any more
                raise EngineStoppedError("the engine core is not taking requests") from None

    def _submit(self, requests: list[Request]) -> None:
        self._send(wire.ADD, (self.front, requests))

    def _submit_abort(self, request_id: str, index: int | None) -> None:
        try:
            self._send(wire.ABORT, (request_id, index))
        except EngineStoppedError:  # a dead core: the receiver ends every stream anyway
            pass

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start taking the core's step messages: on ``loop`` (by default the running event
        loop, when called on one: the server's), which reads the core's socket itself, so a
        step's events reach the streams with no thread and no hand-over between threads; with
        no loop (scripts, tests), on a receiver thread that hands each step to its streams'
        loops."""
        loop = loop or running_loop()
        with self._cond:
            if self._state != "new":
                raise RuntimeError(f"the engine cannot start: it is {self._state}")
            self._state = "running"
            with self._pace_lock:
                self._reading = True
                self._consumed[self.front] = self._received
            if loop is not None:
                self._reader = self._loop = loop
                self._watching = True
            else:
                self._start_receiver()
            self.ready = True
        if loop is not None and loop is running_loop():
            self._watch()
        elif loop is not None:
            loop.call_soon_threadsafe(self._watch)

    def _start_receiver(self) -> None:
        self._receiver = threading.Thread(target=self._receive, name="engine-core-output",
                                          daemon=True)
        self._receiver.start()

    @property
    def _started(self) -> bool:
        return self._receiver is not None or self._reader is not None

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting requests; the core lets in-flight ones finish for up to ``timeout``
        seconds (None: aborts them at once), aborts the rest and exits; its process is killed
        if it has not exited ``JOIN_GRACE`` s after that. Thread-safe; a second call waits for
        the first and then returns."""
        with self._shutdown_lock:
            if self._shut:
                return
            self._shut = True
            self._shutdown(timeout)

    def _shutdown(self, timeout: float | None) -> None:
        if self._process is None:
            self._detach()
            return
        with self._cond:
            failed = self._state == "failed"  # (by ``fail``: the core itself may be alive)
            if self._state in ("new", "running"):
                self._state = "draining"
            started = self._started
            if started and self._process.is_alive():
                try:
                    self._send(wire.SHUTDOWN, 0.0 if failed else timeout or 0.0)
                except EngineStoppedError:
                    pass
        grace = (timeout or 0.0) + JOIN_GRACE
        reader = self._reader
        if reader is not None and (not reader.is_running() or reader is running_loop()):
            # a loop that stopped (or that waits in this call) reads nothing: a thread reads
            self._unwatch_from_here()
            if not self._ended.is_set():
                self._start_receiver()
        if self._receiver is not None:
            self._receiver.join(grace)
            if self._receiver.is_alive():
                log.error("the engine core did not stop in time; killing it")
        elif self._reader is not None:
            if not self._unwatched.wait(grace):
                log.error("the engine core did not stop in time; killing it")
            self._unwatch_from_here()
        self._close(KILL_GRACE if started else 0.0)
        if not started:  # never started: requests queued so far end with an abort
            self._dispatch(self._unfinished(FinishReason.ABORT))
        with self._cond:
            if self._state != "failed":
                self._state = "stopped"
        self.ready = False

    def _detach(self) -> None:
        """A front end that did not spawn the core leaves it: its requests still in the core are
        aborted there (the server drained them already), its streams end, its sockets close. The
        core is stopped by the process that spawned it."""
        self._stop_reading()  # the core must not wait for this front end any more
        with self._cond:
            if self._state in ("new", "running"):
                self._state = "draining"
            for request_id in list(self._live):
                self._submit_abort(request_id, None)
        self._stopping.set()
        if self._receiver is not None:
            self._receiver.join(JOIN_GRACE)
        self._unwatch_from_here()
        self._dispatch(self._unfinished(FinishReason.ABORT))
        with self._inputs_lock:  # the aborts above still reach the core
            self._inputs.setsockopt(zmq.LINGER, 1000)
        self._close()
        with self._cond:
            if self._state != "failed":
                self._state = "stopped"
        self.ready = False

    def _close(self, grace: float = 0.0) -> None:
        """Join the core (killing it after ``grace`` s), close the sockets, remove their folder."""
        process = self._process
        if process is not None and process.is_alive():
            process.join(grace)
        if process is not None and process.is_alive():
            process.kill()
            process.join()
        self._stop_reading()
        self._consumed.close()
        with self._inputs_lock:  # an abort from the event loop may be sending on it
            self._closed = True
            self._inputs.close(0)
        self._outputs.close(0)
        self._context.term()
        if process is not None:  # the folder is the spawning front end's
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None

    def fail(self, reason: str) -> None:
        """End every live request with an error and turn this engine failed (the server then
        exits 4): the server lost a process it cannot serve without."""
        self._fail(reason)

    # ---- from the core -------------------------------------------------------------------------

    def _take(self, frames: list[bytes]) -> bool:
        """Handle one message from the core; True when it was its last (``STOPPED``)."""
        kind, payload = frames
        if kind == wire.STEP:
            events, stats = self._codec.decode_step(payload)
            if stats is not None:
                self._publish(stats)
            self._dispatch(events)
            self._received += 1
            self._count(self._received)
        elif kind == wire.STOPPED:
            self._ended.set()
            if self._process is None and not self._stopping.is_set():
                self._fail(f"the engine core process (pid {self.pid}) stopped")
            return True
        elif kind == wire.FAILED:
            self._failure = payload.decode(errors="replace")
        return False

    def _exited(self) -> None:
        """The core this process spawned exited: fail what is left, saying how it ended."""
        self._ended.set()
        self._process.join()
        status = _exit_status(self._process.exitcode)
        self._fail(f"the engine core process (pid {self.pid}) exited ({status})"
                   + (f": {self._failure}" if self._failure else ""))

    # (the event loop that reads the core's socket: ``start(loop)``)

    def _watch(self) -> None:
        """On the reading loop: read the core's socket whenever it signals, and watch for the
        core's exit (its process sentinel; every ``ATTACHED_POLL_MS`` for a front end that did
        not spawn it)."""
        if not self._watching:  # shut down before the loop got here
            return
        loop = self._reader
        loop.add_reader(self._outputs.getsockopt(zmq.FD), self._on_outputs)
        if self._process is not None:
            loop.add_reader(self._process.sentinel, self._on_exit)
        else:
            self._timer = loop.call_later(ATTACHED_POLL_MS / 1000, self._check_gone)
        self._on_outputs()  # (the socket's fd is edge-triggered: take what came before)

    def _on_outputs(self) -> None:
        """Every message waiting on the core's socket (ZMQ's fd signals edges, not levels: read
        until none is left)."""
        try:
            while self._watching:
                try:
                    frames = self._outputs.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                if self._take(frames):
                    self._unwatch()
        except BaseException as err:  # noqa: BLE001 - the streams must still end
            log.exception("reading the engine core's output failed")
            self._unwatch()
            self._fail(f"the engine core's output could not be read: {err!r}")

    def _on_exit(self) -> None:
        self._on_outputs()  # what the core sent before it exited (its last events, FAILED)
        if self._watching:
            self._unwatch()
            self._exited()

    def _check_gone(self) -> None:
        if not self._watching:
            return
        if (gone := self._gone()) is not None:
            self._unwatch()
            self._fail(gone)
        else:
            self._timer = self._reader.call_later(ATTACHED_POLL_MS / 1000, self._check_gone)

    def _unwatch(self) -> None:
        """On the reading loop (or with it stopped): stop reading the core's socket."""
        if self._watching:
            self._watching = False
            loop = self._reader
            if not loop.is_closed():
                loop.remove_reader(self._outputs.getsockopt(zmq.FD))
                if self._process is not None:
                    loop.remove_reader(self._process.sentinel)
            if self._timer is not None:
                self._timer.cancel()
        self._unwatched.set()

    def _unwatch_from_here(self) -> None:
        """Make the reading loop let go of the core's socket (before it closes, or before a
        thread reads it); from another thread, wait until it has."""
        loop = self._reader
        if loop is None or self._unwatched.is_set():
            return
        if loop.is_running() and loop is not running_loop():
            try:
                loop.call_soon_threadsafe(self._unwatch)
            except RuntimeError:  # closed since
                pass
            else:
                if self._unwatched.wait(JOIN_GRACE):
                    return
                log.error("the event loop did not let go of the engine core's socket")
        self._unwatch()  # a loop that does not run calls nothing meanwhile

    # (the receiver thread: ``start()`` with no loop)

    def _receive(self) -> None:
        poller = self._poller()
        spawned = self._process is not None
        try:
            while True:
                ready = dict(poller.poll(None if spawned else ATTACHED_POLL_MS))
                if not ready and not spawned:
                    if self._stopping.is_set():
                        return
                    if (gone := self._gone()) is not None:
                        self._fail(gone)
                        return
                    continue
                if self._outputs in ready:
                    if self._take(self._outputs.recv_multipart()):
                        return
                elif self._process.sentinel in ready:
                    self._exited()
                    return
        except BaseException as err:  # noqa: BLE001 - the streams must still end
            log.exception("the engine core's output receiver failed")
            self._fail(f"the engine core's output could not be read: {err!r}")

    def _count(self, received: int) -> None:
        """Tell the core ``received`` step messages are consumed once the event loop has handed
        them to its streams (after the ``_dispatch`` callbacks queued before this one); at once
        when no loop reads them (no request yet, or its loop is closed)."""
        loop = self._loop
        if loop is self._reader and loop is not None:  # on it: the events are delivered
            self._consumed_to(received)
            return
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._consumed_to, received)
                return
            except RuntimeError:  # that loop is closed
                self._loop = None
        self._consumed_to(received)

    def _consumed_to(self, received: int) -> None:
        with self._pace_lock:
            if self._reading:
                self._consumed[self.front] = received

    def _stop_reading(self) -> None:
        with self._pace_lock:
            if self._reading:
                self._reading = False
                self._consumed[self.front] = NOT_READING

    def _fail(self, reason: str) -> None:
        log.error("%s; failing every live request", reason)
        with self._cond:
            if self.error is None:  # the first cause is the one to report
                self.error = CoreDiedError(reason)
            self._state = "failed"
        self.ready = False
        self._dispatch(self._unfinished(FinishReason.ERROR))


@dataclass(frozen=True)
class Seat:
    """What one more API-server process needs to join a running core (pickled to it at spawn):
    the core's socket folder, which front end it is of how many, the engine config, the
    checkpoint's description (no weights), the shared admission count, and the pid of the
    server's first process (the one that spawned the core)."""

    directory: str
    front: int
    fronts: int
    config: EngineConfig
    checkpoint: Checkpoint
    live: SharedCount
    leader: int


SOCKET_PATH_MAX = 107  # bytes in a UNIX socket's path on Linux (sun_path, less its NUL)


def _socket_folder(fronts: int) -> str:
    """A new private folder for the core's sockets and shared files: under TMPDIR like any
    temporary file, or under /tmp when TMPDIR is too deep for a socket's path to fit."""
    # the longest socket path: the parent, mkdtemp's name (the prefix and 8 characters), the
    # last front end's output socket (_addresses)
    tail = len(f"/gptserve-core-XXXXXXXX/outputs-{fronts - 1}")
    tried = []
    for parent in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        if len(os.fsencode(parent)) + tail <= SOCKET_PATH_MAX:
            return tempfile.mkdtemp(prefix="gptserve-core-", dir=parent)
        tried.append(parent)
    raise CoreStartError(
        f"no folder short enough for the engine core's sockets (a UNIX socket's path holds "
        f"{SOCKET_PATH_MAX} bytes): tried {', '.join(tried)}; set TMPDIR to a shorter folder")


def _addresses(directory: str, fronts: int) -> tuple[str, tuple[str, ...]]:
    """The core's ZMQ addresses: its input (every front end pushes to it) and one output per
    front end."""
    return (f"ipc://{directory}/inputs",
            tuple(f"ipc://{directory}/outputs-{i}" for i in range(fronts)))


def _consumed_path(directory: str) -> str:
    """The core's ``ConsumedSteps`` file (output pacing)."""
    return f"{directory}/consumed"


def _kill_at_exit(process: multiprocessing.process.BaseProcess, directory: str) -> None:
    """At interpreter exit, for a client never shut down: kill its core, remove its folder."""
    if process.is_alive():
        log.warning("the engine core (pid %s) was not shut down; killing it at exit", process.pid)
        process.kill()
        process.join(KILL_GRACE)
    shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"
