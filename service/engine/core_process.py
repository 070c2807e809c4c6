"""The engine-core process: owns the device and the model, and steps it in a busy loop.

``run_core(spec)`` is the spawned process's whole life: load the checkpoint, build the
``EngineCore`` (scheduler, runner, sampler), warm it up, say ``READY``, then loop: drain every
waiting input (add, abort, shutdown) without blocking while there is work, take one step, send
that step's events and stats as one message. Idle, it blocks on its input socket; so it does
while a front end has ``pacing.STEPS_AHEAD`` step messages it has not consumed yet (output
pacing: the next step then carries every row that became ready meanwhile). On shutdown it
lets in-flight requests run until the deadline the front end sent, aborts the rest, sends
``STOPPED`` and exits. Anything that escapes a step's own error handling fails every live
request (one ``error`` finish each), sends ``FAILED`` and exits 1: the front end reports it.

The core ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group; the front end
drains and then tells the core to stop) and exits when its front end is gone (its parent pid
changes; checked before every step and every idle second), removing the folder of its sockets
that the dead front end could not. ``PR_SET_PDEATHSIG`` would not do: it fires when the *thread*
that spawned the core exits, and a loading thread spawns it.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from service.engine import pacing, wire
from service.engine.config import EngineConfig
from service.engine.pacing import ConsumedSteps
from service.engine.types import EngineStats, FinishReason, TokenEvents
from service.logs import configure_logging

log = logging.getLogger("service.engine.core")
IDLE_POLL_MS = 1000  # an idle core wakes this often to check that its front end is alive


@dataclass(frozen=True)
class CoreSpec:
    """Everything the spawned core needs (pickled to it at spawn)."""

    checkpoint: Path
    config: EngineConfig
    inputs: str  # the ZMQ address the core binds; every front end pushes its inputs to it
    outputs: tuple[str, ...]  # per front end (API-server process): where it pulls step messages
    consumed: str  # the ``ConsumedSteps`` file: step messages each front end has consumed
    counters: str  # the ``CoreCounters`` file the core counts into (its front ends read it)
    log_level: str = "info"
    log_format: str = "text"
    # bench and tests only: "module:function", a function of no arguments returning the
    # ``Checkpoint`` to serve instead of loading ``checkpoint`` (bench/hostcost.py's stand-in
    # whose forward costs nothing); imported and called in the core process
    model_factory: str | None = None
    # the pid of the front end that spawns the core (its parent): the core exits once its parent
    # is another process. Read by the core itself, it would be init's when the front end died
    # while the core was still importing, and the core would then idle for ever.
    parent: int = 0
    # bench only: cProfile the core's loop in its own thread CPU time, stats written here at exit
    profile: str | None = None


def run_core(spec: CoreSpec) -> None:
    """The core process's entry point (``multiprocessing`` spawn target)."""
    parent = spec.parent or os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(spec.log_level, spec.log_format)
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)  # fair-queued from every front end
    inputs.setsockopt(zmq.LINGER, 0)
    inputs.bind(spec.inputs)
    outputs = Outputs(context, spec.outputs, ConsumedSteps(spec.consumed))
    codec = wire.OutputCodec()
    status = 1
    try:
        try:
            core, info = _build(spec)
        except BaseException as err:  # noqa: BLE001 - the front end reports it
            log.exception("the engine core could not start")
            outputs.send_all([wire.FAILED, str(err).encode()])
            return
        outputs.send_all(codec.ready(info))
        loop = CoreLoop(core, inputs, outputs, codec, parent)
        status = loop.run() if spec.profile is None else _profiled(loop.run, spec.profile)
    finally:
        inputs.close(0)
        outputs.close()  # lingers until the last messages are out
        context.term()
        if os.getppid() != parent:  # the front end died without cleaning up: its folder is ours
            shutil.rmtree(os.path.dirname(spec.inputs.removeprefix("ipc://")), ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # no interpreter teardown (torch's threads, atexit): the work is done


def _build(spec: CoreSpec):
    from model.checkpoint import load_checkpoint
    from service.engine.core import EngineCore
    from service.engine.counters import CoreCounters
    from service.engine.engine import resolve_device, resolve_dtype, thread_plan
    from service.engine.grammar import GrammarCompiler
    from service.engine.memory import plan_slots

    config = spec.config
    if spec.model_factory is not None:
        checkpoint = _from_factory(spec.model_factory)
    else:  # the front end loaded this checkpoint already (and checked it fits): no second budget
        checkpoint = load_checkpoint(spec.checkpoint, budget=lambda _config: None)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    n_slots = plan_slots(checkpoint.config, dtype, config, device)
    threads = thread_plan(config, device)
    log.info("engine core (pid %d): %s", os.getpid(), threads.describe())
    # structured outputs: this process's own cache (the front end validated each constraint
    # with its own); the vocabulary's grammar tokenizer is built now, not on the first request
    grammars = GrammarCompiler(checkpoint.tokenizer, config.grammar_cache,
                               config.max_grammar_bytes)
    grammars.tokenizer  # noqa: B018 (built eagerly)
    core = EngineCore(checkpoint.model, checkpoint.tokenizer.vocab_size,
                      checkpoint.tokenizer.eot_id, config, n_slots, device, dtype, threads,
                      grammars, CoreCounters.open(spec.counters, writable=True))
    core.apply_threads()
    with torch.inference_mode():
        core.runner.warm_up()
    # everything alive now lives as long as the core: keep it out of the collector's passes
    gc.freeze()
    info = wire.CoreInfo(n_slots=n_slots, window_shift=core.window_shift, threads=threads,
                    vocab_size=checkpoint.tokenizer.vocab_size,
                    block_size=checkpoint.config.block_size, pid=os.getpid())
    return core, info


def _profiled(run, path: str) -> int:
    import cProfile

    profiler = cProfile.Profile(time.thread_time)
    try:
        return profiler.runcall(run)
    finally:
        profiler.dump_stats(path)


def _from_factory(name: str):
    """The checkpoint that the function ``name`` ("module:function") returns."""
    module, colon, function = name.partition(":")
    if not (module and colon and function):
        raise ValueError(f"model_factory must be 'module:function', got {name!r}")
    return getattr(importlib.import_module(module), function)()


class Outputs:
    """The core's step messages, to the front end that sent each request.

    One front end (the default): every step goes whole to it. Several (``--api-servers N``):
    each step's events are split by the front end that added their request (``owner``), every
    front end gets the step's stats, and a request's owner is forgotten once each of its choices
    has finished. It counts the step messages sent to each front end, so the loop can wait while
    one of them has ``pacing.STEPS_AHEAD`` of them unconsumed (``ahead``).
    """

    def __init__(self, context: zmq.Context, addresses: tuple[str, ...],
                 consumed: ConsumedSteps) -> None:
        self.consumed = consumed
        self.sent = [0] * len(addresses)
        self.sockets = []
        for address in addresses:
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 5000)
            sock.setsockopt(zmq.SNDHWM, 0)  # a slow front end must never stall the core
            sock.connect(address)
            self.sockets.append(sock)
        self._owner: dict[str, int] = {}  # request id -> front end (several front ends only)
        self._open: dict[str, int] = {}  # request id -> choices not finished yet

    def added(self, front: int, requests) -> None:
        if len(self.sockets) > 1:
            for request in requests:
                self._owner[request.request_id] = front
                self._open[request.request_id] = request.params.n

    def send_all(self, frames: list[bytes]) -> None:
        for sock in self.sockets:
            sock.send_multipart(frames)

    def send_step(self, codec, events: TokenEvents, stats: EngineStats | None) -> None:
        if len(self.sockets) == 1:
            self.sockets[0].send_multipart(codec.step(events, stats))
            self.sent[0] += 1
            return
        rows: list[list[int]] = [[] for _ in self.sockets]
        owner = self._owner
        for row, request_id in enumerate(events.request_ids):
            rows[owner.get(request_id, 0)].append(row)
        for row in events.finishes:
            request_id = events.request_ids[row]
            left = self._open.get(request_id, 1) - 1
            if left > 0:
                self._open[request_id] = left
            else:
                self._open.pop(request_id, None)
                owner.pop(request_id, None)
        for front, (sock, mine) in enumerate(zip(self.sockets, rows, strict=True)):
            if mine or stats is not None:
                part = TokenEvents()
                if mine:
                    part.take(events, mine)
                sock.send_multipart(codec.step(part, stats))
                self.sent[front] += 1

    def ahead(self) -> bool:
        """Whether a front end that is reading has ``STEPS_AHEAD`` step messages unconsumed."""
        return pacing.ahead(self.consumed, self.sent)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.consumed.close()


class CoreLoop:
    """Drain inputs, step, send: until a shutdown's work is done (returns the exit status)."""

    def __init__(self, core, inputs, outputs, codec, parent: int) -> None:
        self.core = core
        self.inputs = inputs
        # one poller for the loop's life (``Socket.poll`` builds one a call: 3.8 vs 1.8 us)
        self.waiting = zmq.Poller()
        self.waiting.register(inputs, zmq.POLLIN)
        self.outputs = outputs
        self.codec = codec
        self.parent = parent
        self.deadline: float | None = None  # set by a shutdown: abort what is left then
        self.last_stats: EngineStats | None = None

    def run(self) -> int:
        with torch.inference_mode():  # once for the loop: a step entering it costs ~10 us
            return self._run()

    def _run(self) -> int:
        core = self.core
        try:
            while True:
                events = TokenEvents()
                if not self._drain(events):
                    return 0  # the front end is gone: nobody to serve
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    events.extend(core.abort_all(FinishReason.ABORT))
                stats = None
                if core.has_work():
                    stats, stepped = self._step()
                    if len(events):
                        events.extend(stepped)
                    else:
                        events = stepped
                elif len(events):  # aborts emptied the core: publish the idle load
                    stats = self._idle_stats()
                if len(events) or stats is not None:
                    self.outputs.send_step(self.codec, events, stats)
                if self.deadline is not None and not core.has_work():
                    self.outputs.send_all([wire.STOPPED, b""])
                    return 0
        except BaseException as err:  # noqa: BLE001 - reported to every stream and the front end
            log.exception("the engine core failed; failing every live request")
            try:
                self.outputs.send_step(self.codec, core.abort_all(FinishReason.ERROR),
                                       self._idle_stats())
            finally:
                self.outputs.send_all([wire.FAILED, repr(err).encode()])
            return 1

    def _drain(self, events) -> bool:
        """Apply every waiting input; block for one while there is nothing to do, or while a
        front end has ``STEPS_AHEAD`` step messages unconsumed (then the next step takes every
        request that arrived meanwhile; not once a shutdown is under way). False when the front
        end that spawned this core is gone."""
        core = self.core
        outputs = self.outputs
        while True:
            idle = not core.has_work() and self.deadline is None and not len(events)
            paced = not idle and self.deadline is None and outputs.ahead()
            timeout = IDLE_POLL_MS if idle else pacing.PACE_POLL_MS if paced else 0
            if not self.waiting.poll(timeout):
                if os.getppid() != self.parent:
                    return False
                if idle or paced:
                    continue
                return True
            kind, payload = wire.decode_input(self.inputs.recv_multipart(zmq.NOBLOCK))
            if kind == wire.ADD:
                front, requests = payload
                self.outputs.added(front, requests)
                for request in requests:
                    core.add_request(request)
            elif kind == wire.ABORT:
                events.extend(core.abort(*payload))
            elif kind == wire.SHUTDOWN:
                self.deadline = time.monotonic() + payload

    def _step(self):
        try:
            result = self.core.step()
        except Exception:  # a failed step fails the requests in it, not the core
            log.exception("engine step failed; failing every in-flight request")
            return self._idle_stats(), self.core.abort_all(FinishReason.ERROR)
        self.last_stats = result.stats
        return result.stats, result.outputs

    def _idle_stats(self):
        return self.core.idle_stats(self.last_stats or EngineStats(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0))
