"""The engine facade the HTTP layer calls: a model resident on its device, served by one thread.

``add_request`` (from a coroutine) validates and queues a request and returns its
``RequestStream``; the engine thread loops schedule -> run -> sample -> post-process and hands
each request's events to its stream with ``loop.call_soon_threadsafe``. The event loop never runs
model code. ``run``/``generate`` drive the same core synchronously (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Iterable, Iterator

import torch

from model.checkpoint import Checkpoint
from model.quantize import int8_supported
from model.threads import ThreadPlan, plan_threads
from service.engine.config import EngineConfig
from service.engine.core import EngineCore
from service.engine.front import EngineFront, ended
from service.engine.grammar import GrammarCompiler
from service.engine.memory import plan_slots
from service.engine.types import (
    EngineStats,
    FinishReason,
    Request,
    RequestOutput,
    TokenEvents,
)

log = logging.getLogger(__name__)
JOIN_GRACE = 10.0  # seconds shutdown waits for the engine thread beyond its drain timeout
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def check_quantization(quantization: str, device: torch.device) -> None:
    """Refuse int8 weights where there are no kernels for them: they run on fbgemm's x86 CPU
    kernels only (``model.quantize``). On CUDA, bf16 (the default there) halves the bytes."""
    if quantization != "int8":
        return
    if device.type != "cpu":
        raise ValueError(
            f"int8 weights run on CPU only (fbgemm's int8 kernels), and the engine's device is "
            f"{device.type}: use --device cpu, or --quantization none (bf16, the CUDA default, "
            f"halves the weight bytes)")
    if not int8_supported():
        raise ValueError("int8 weights need PyTorch's fbgemm kernels, which this PyTorch build "
                         "lacks (x86 CPU builds have them)")


def thread_plan(config: EngineConfig, device: torch.device) -> ThreadPlan:
    """The CPU threads the engine runs (``model.threads``). The count stays fixed on CUDA (step
    times measure the GPU there, not the threads) and with ``batch_invariant`` (a CPU matmul's
    rounding may depend on how many threads split it)."""
    plan = plan_threads(config.threads)
    fixed = device.type == "cuda" or config.batch_invariant
    return dataclasses.replace(plan, adaptive=False) if fixed else plan


class Engine(EngineFront):
    """The in-process engine: the API side (``EngineFront``: admission, streams, dispatch) and
    one thread that steps the model runner/scheduler core (``EngineCore``).

    Read-only attributes beyond ``EngineFront``'s: ``checkpoint``; ``config.quantization`` is
    the weights' precision. The core and the front share
    one grammar compiler (``grammars``): what the API compiled, the core finds cached.
    """

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        check_quantization(config.quantization, device)
        n_slots = plan_slots(checkpoint.config, dtype, config, device)
        threads = thread_plan(config, device)
        log.info("%s", threads.describe())
        grammars = GrammarCompiler(checkpoint.tokenizer, config.grammar_cache,
                                   config.max_grammar_bytes)
        self._core = EngineCore(
            checkpoint.model, checkpoint.tokenizer.vocab_size, checkpoint.tokenizer.eot_id,
            config, n_slots, device, dtype, threads, grammars,
        )
        super().__init__(checkpoint.tokenizer, checkpoint.config, config, device=device,
                         dtype=dtype, n_slots=n_slots, threads=threads,
                         window_shift=self._core.window_shift, grammars=grammars)
        self.checkpoint = checkpoint
        self.counters = self._core.counters
        self._deadline: float | None = None
        self._inbox: list[Request] = []
        self._aborts: list[tuple[str, int | None]] = []
        self._thread: threading.Thread | None = None

    def _submit(self, requests: list[Request]) -> None:
        self._inbox.extend(requests)
        self._cond.notify()

    def _submit_abort(self, request_id: str, index: int | None) -> None:
        self._aborts.append((request_id, index))
        self._cond.notify()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread. (``loop``, for ``CoreClient.start``'s signature, is unused:
        this engine's thread hands each step to each request's own event loop.)"""
        with self._cond:
            if self._state != "new":
                raise RuntimeError(f"the engine cannot start: it is {self._state}")
            self._state = "running"
            self._thread = threading.Thread(target=self._supervised_loop, name="engine",
                                            daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting requests; let in-flight ones finish for up to ``timeout`` seconds
        (None: abort them at once), abort the rest, and join the engine thread (giving up after
        ``timeout`` + ``JOIN_GRACE`` s: a step that never returns cannot hold the process)."""
        with self._cond:
            if self._state in ("new", "running"):
                self._deadline = time.monotonic() + (timeout or 0.0)
                self._state = "draining" if self._thread is not None else "stopped"
            self._cond.notify()
        if self._thread is not None:
            self._thread.join((timeout or 0.0) + JOIN_GRACE)
            if self._thread.is_alive():
                log.error("the engine thread did not stop in time; abandoning it")
        else:  # never started: requests queued so far end with an abort event
            self._fail_pending(FinishReason.ABORT)
        with self._cond:
            if self._state != "failed":
                self._state = "stopped"
        self.ready = False

    # ---- the engine thread -------------------------------------------------------------------

    def _supervised_loop(self) -> None:
        """The engine thread: any exception that escapes a step's own handling (warm-up, the
        loop's bookkeeping, a listener) kills the engine loudly, not silently: every live request
        gets an error event, ``ready`` turns false and new requests are refused."""
        try:
            self._core.apply_threads()
            with torch.inference_mode():
                self._core.runner.warm_up()
            # everything alive now (model, tokenizer, app) lives as long as the server: keep it
            # out of the cyclic collector's generations, so its full passes stay short
            gc.freeze()
            self.ready = True
            with torch.inference_mode():  # once for the loop, not per step
                self._loop()
        except BaseException as err:  # noqa: BLE001 - reported to every stream and to /ready
            log.exception("the engine thread failed; failing every live request")
            with self._cond:
                self.error = err
                self._state = "failed"
            self.ready = False
            self._fail_pending(FinishReason.ERROR)

    def _fail_pending(self, reason: FinishReason) -> None:
        """End every live request with ``reason``: those in the core and those still queued."""
        with self._cond:
            pending, self._inbox = self._inbox, []
            self._aborts.clear()
        outputs = TokenEvents()
        for r in pending:
            ended(outputs, r.request_id, range(r.params.n), reason, len(r.prompt_token_ids))
        try:
            outputs.extend(self._core.abort_all(reason))
        except Exception:  # noqa: BLE001 - the core is broken: end the streams directly
            log.exception("cannot abort the engine core's requests")
            outputs = self._unfinished(reason)
        self._dispatch(outputs)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._idle():
                    self._cond.wait()
                for request in self._inbox:
                    self._core.add_request(request)
                self._inbox.clear()
                aborts, self._aborts = self._aborts, []
                # "stopped" here: shutdown gave up on a step that later returned; leave at once
                # (never spin on with nothing to do)
                abandoned = self._state == "stopped"
                draining = abandoned or self._state == "draining"
            outputs = TokenEvents()
            for request_id, index in aborts:
                outputs.extend(self._core.abort(request_id, index))
            if draining and (abandoned or time.monotonic() >= self._deadline):
                outputs.extend(self._core.abort_all(FinishReason.ABORT))
            if self._core.has_work():
                stepped = self._step()
                if len(outputs):
                    outputs.extend(stepped)
                else:
                    outputs = stepped
            elif len(outputs):  # aborts emptied the engine: publish the idle load (no step will)
                self._publish(self._idle_stats())
            self._dispatch(outputs)
            if draining and not self._core.has_work():
                return

    def _idle(self) -> bool:
        if self._inbox or self._aborts or self._core.has_work():
            return False
        return self._state == "running"

    def _idle_stats(self) -> EngineStats:
        return self._core.idle_stats(self._stats)

    def _step(self) -> TokenEvents:
        try:
            result = self._core.step()
        except Exception:  # a failed step fails the requests in it, not the server
            log.exception("engine step failed; failing every in-flight request")
            outputs = self._core.abort_all(FinishReason.ERROR)
            self._publish(self._idle_stats())
            return outputs
        self._publish(result.stats)
        return result.outputs

    # ---- synchronous use (tests, benchmarks; no thread) --------------------------------------

    def run(
        self, requests: Iterable[Request], arrival_steps: Iterable[int] | None = None
    ) -> dict[str, list[RequestOutput]]:
        """Serve ``requests`` to completion on the calling thread; every event per request id.

        Request i joins the batch before step ``arrival_steps[i]`` (default: all at step 0).
        """
        if self._thread is not None:
            raise RuntimeError("run() drives the engine synchronously; the thread is started")
        requests = list(requests)
        for request in requests:
            self.validate(request)
        self._core.apply_threads()
        self._core.runner.warm_up()
        with torch.inference_mode():
            return self._core.run(requests, arrival_steps)

    def iterate(self, requests: Iterable[Request]) -> Iterator[RequestOutput]:
        """Serve ``requests`` on the calling thread (no engine thread, no queue limit), yielding
        every event as its step produces it; ``cancel`` ends a choice at once meanwhile."""
        for events in self.steps(requests):
            yield from events.events()

    def steps(self, requests: Iterable[Request]) -> Iterator[TokenEvents]:
        """Serve ``requests`` on the calling thread, yielding each step's events as columns
        (what ``iterate`` yields one object per event of)."""
        if self._thread is not None:
            raise RuntimeError("steps() drives the engine synchronously; the thread is started")
        requests = list(requests)
        for request in requests:
            self.validate(request)
        self._core.apply_threads()
        self._core.runner.warm_up()
        for request in requests:
            self._core.add_request(request)
        while self._core.has_work():
            yield self._core.step().outputs

    def cancel(self, request_id: str, index: int | None = None) -> None:
        """End a choice (or a whole request) during ``iterate``; its slot is free at once."""
        self._core.abort(request_id, index)

    def generate(
        self, requests: Iterable[Request], arrival_steps: Iterable[int] | None = None
    ) -> list[list[int]]:
        """Token ids generated for each choice of each request, in request then choice order."""
        requests = list(requests)
        events = self.run(requests, arrival_steps)
        result = []
        for request in requests:
            choices: list[list[int]] = [[] for _ in range(request.params.n)]
            for out in events[request.request_id]:
                if out.token_id is not None:
                    choices[out.index].append(out.token_id)
            result.extend(choices)
        return result

