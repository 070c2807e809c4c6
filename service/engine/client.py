"""The front end's handle on an engine-core process: the API side of an engine, stepping nowhere.

``CoreClient(checkpoint, config)`` spawns the engine-core process (``core_process.run_core``),
which loads the same checkpoint, plans its slots and threads, warms up and says ``READY``; the
client is then an engine to the rest of the server: it admits requests exactly
(``EngineFront``), sends them and aborts to the core over ZMQ, and a receiver thread takes the
core's one message per step and hands its events to the request streams, its stats to the stats
listeners. The HTTP event loop and the model no longer share a GIL.

If the core process dies (a crash, the OOM killer, a SIGKILL), every live request ends with an
``error`` finish, ``error`` says why, ``ready`` turns false and new requests are refused; the
server then exits non-zero so its supervisor restarts it (``fatal_on_failure``).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import shutil
import tempfile
import threading

import zmq

from model.checkpoint import Checkpoint
from service.engine import wire
from service.engine.config import EngineConfig
from service.engine.core_process import CoreSpec, run_core
from service.engine.engine import (
    JOIN_GRACE,
    check_quantization,
    resolve_device,
    resolve_dtype,
)
from service.engine.front import EngineFront
from service.engine.types import EngineError, EngineStoppedError, FinishReason, Request

log = logging.getLogger(__name__)
KILL_GRACE = 5.0  # seconds a stopped core gets to exit before it is killed


class CoreStartError(EngineError):
    """The engine-core process could not load, plan or warm up its model."""


class CoreDiedError(EngineError):
    """The engine-core process exited while serving."""


class CoreClient(EngineFront):
    """An engine whose core runs in its own process. Attributes as ``EngineFront``'s, plus
    ``checkpoint`` (its description: path, config, tokenizer, provenance; the weights live in
    the core only), ``pid`` (the core's) and ``fatal_on_failure`` (True: a dead core ends the
    server). ``model_factory`` (bench and tests only): "module:function" that the core calls
    for the checkpoint to serve instead of loading ``checkpoint.path`` (``CoreSpec``)."""

    fatal_on_failure = True

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None, *,
                 log_level: str = "info", log_format: str = "text",
                 model_factory: str | None = None) -> None:
        config = config or EngineConfig()
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        check_quantization(config.quantization, device)  # refused here, before any spawn
        self._dir = tempfile.mkdtemp(prefix="gptserve-core-")  # 0700: ours alone
        self._context = zmq.Context()
        self._inputs = self._context.socket(zmq.PUSH)
        self._outputs = self._context.socket(zmq.PULL)
        self._inputs.setsockopt(zmq.SNDHWM, 0)  # never block the event loop on a busy core
        self._inputs.setsockopt(zmq.LINGER, 0)
        self._outputs.setsockopt(zmq.LINGER, 0)
        self._inputs.bind(f"ipc://{self._dir}/inputs")
        self._outputs.bind(f"ipc://{self._dir}/outputs")
        self._codec = wire.OutputCodec()
        spec = CoreSpec(checkpoint.path, config, f"ipc://{self._dir}/inputs",
                        f"ipc://{self._dir}/outputs", log_level, log_format, model_factory)
        self._process = multiprocessing.get_context("spawn").Process(
            target=run_core, args=(spec,), name="gptserve-engine-core", daemon=True)
        self._process.start()
        try:
            info = self._wait_ready(checkpoint)
        except BaseException:
            self._close()
            raise
        super().__init__(checkpoint.tokenizer, checkpoint.config, config, device=device,
                         dtype=dtype, n_slots=info.n_slots, threads=info.threads,
                         window_shift=info.window_shift)
        # the front end keeps what describes the checkpoint, not its weights (the core has them)
        self.checkpoint = dataclasses.replace(checkpoint, model=None)
        self.pid = info.pid
        self._receiver: threading.Thread | None = None

    def _poller(self) -> zmq.Poller:
        """Wakes for the core's next message or for its exit, whichever comes first."""
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self._process.sentinel, zmq.POLLIN)
        return poller

    def _wait_ready(self, checkpoint: Checkpoint) -> wire.CoreInfo:
        poller = self._poller()
        while True:
            ready = dict(poller.poll())
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
            if self._process.sentinel in ready:
                self._process.join()
                raise CoreStartError(
                    f"the engine core process exited ({_exit_status(self._process.exitcode)}) "
                    "before it was ready")

    # ---- to the core ---------------------------------------------------------------------------

    def _send(self, kind: bytes, payload) -> None:
        """Send an input (holding ``_cond``: one sender at a time on the ZMQ socket)."""
        try:
            self._inputs.send_multipart(wire.encode_input(kind, payload), zmq.NOBLOCK)
        except zmq.Again:  # no core connected any more
            raise EngineStoppedError("the engine core is not taking requests") from None

    def _submit(self, requests: list[Request]) -> None:
        self._send(wire.ADD, requests)

    def _submit_abort(self, request_id: str, index: int | None) -> None:
        try:
            self._send(wire.ABORT, (request_id, index))
        except EngineStoppedError:  # a dead core: the receiver ends every stream anyway
            pass

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._state != "new":
                raise RuntimeError(f"the engine cannot start: it is {self._state}")
            self._state = "running"
            self._receiver = threading.Thread(target=self._receive, name="engine-core-output",
                                              daemon=True)
            self._receiver.start()
            self.ready = True

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting requests; the core lets in-flight ones finish for up to ``timeout``
        seconds (None: aborts them at once), aborts the rest and exits; its process is killed
        if it has not exited ``JOIN_GRACE`` s after that."""
        with self._cond:
            running = self._state == "running"
            if self._state in ("new", "running"):
                self._state = "draining"
                if running:
                    try:
                        self._send(wire.SHUTDOWN, timeout or 0.0)
                    except EngineStoppedError:
                        pass
        if self._receiver is not None:
            self._receiver.join((timeout or 0.0) + JOIN_GRACE)
            if self._receiver.is_alive():
                log.error("the engine core did not stop in time; killing it")
        self._close(KILL_GRACE if self._receiver is not None else 0.0)
        if self._receiver is None:  # never started: requests queued so far end with an abort
            self._dispatch(self._unfinished(FinishReason.ABORT))
        with self._cond:
            if self._state != "failed":
                self._state = "stopped"
        self.ready = False

    def _close(self, grace: float = 0.0) -> None:
        """Join the core (killing it after ``grace`` s), close the sockets, remove their folder."""
        process = self._process
        if process.is_alive():
            process.join(grace)
        if process.is_alive():
            process.kill()
            process.join()
        self._inputs.close(0)
        self._outputs.close(0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- from the core (the receiver thread) -----------------------------------------------------

    def _receive(self) -> None:
        poller = self._poller()
        failure: str | None = None
        try:
            while True:
                ready = dict(poller.poll())
                if self._outputs in ready:
                    kind, payload = self._outputs.recv_multipart()
                    if kind == wire.STEP:
                        events, stats = self._codec.decode_step(payload)
                        if stats is not None:
                            self._publish(stats)
                        self._dispatch(events)
                    elif kind == wire.STOPPED:
                        return
                    elif kind == wire.FAILED:
                        failure = payload.decode(errors="replace")
                elif self._process.sentinel in ready:
                    self._process.join()
                    status = _exit_status(self._process.exitcode)
                    self._fail(f"the engine core process (pid {self.pid}) exited ({status})"
                               + (f": {failure}" if failure else ""))
                    return
        except BaseException as err:  # noqa: BLE001 - the streams must still end
            log.exception("the engine core's output receiver failed")
            self._fail(f"the engine core's output could not be read: {err!r}")

    def _fail(self, reason: str) -> None:
        log.error("%s; failing every live request", reason)
        with self._cond:
            self.error = CoreDiedError(reason)
            self._state = "failed"
        self.ready = False
        self._dispatch(self._unfinished(FinishReason.ERROR))


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"
