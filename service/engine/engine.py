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
from collections.abc import Callable, Iterable, Iterator

import torch

from model.checkpoint import Checkpoint
from model.threads import ThreadPlan, plan_threads
from service.engine.config import EngineConfig
from service.engine.core import EngineCore
from service.engine.memory import plan_slots
from service.engine.stream import RequestStream, put_all
from service.engine.types import (
    EngineStats,
    EngineStoppedError,
    Finish,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestOutput,
    SamplingParams,
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


def _thread_plan(config: EngineConfig, device: torch.device) -> ThreadPlan:
    """The CPU threads the engine runs (``model.threads``). The count stays fixed on CUDA (step
    times measure the GPU there, not the threads) and with ``batch_invariant`` (a CPU matmul's
    rounding may depend on how many threads split it)."""
    plan = plan_threads(config.threads)
    fixed = device.type == "cuda" or config.batch_invariant
    return dataclasses.replace(plan, adaptive=False) if fixed else plan


class Engine:
    """Owns the model runner/scheduler core, the engine thread, and the streams of live requests.

    Read-only attributes: ``tokenizer``, ``model_config``, ``vocab_size`` (the tokenizer's),
    ``eos_token_id``, ``checkpoint``, ``device``, ``dtype``, ``config``, ``n_slots``, ``threads``
    (the CPU thread plan), ``window_shift`` (in force), ``ready`` (the thread has taken its
    warm-up step and is alive),
    ``error`` (why the engine thread died, if it did).

    Admission counts sequences (each choice of each prompt): a request is accepted while every
    live sequence, its own included, fits the slots plus ``max_queue``; an aborted request's
    sequences stop counting at once, not when the engine thread gets to them.
    """

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.checkpoint = checkpoint
        self.tokenizer = checkpoint.tokenizer
        self.model_config = checkpoint.config
        self.vocab_size = checkpoint.tokenizer.vocab_size
        self.eos_token_id = checkpoint.tokenizer.eot_id
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        self.n_slots = plan_slots(self.model_config, self.dtype, self.config, self.device)
        self.threads = _thread_plan(self.config, self.device)
        log.info("%s", self.threads.describe())
        self._core = EngineCore(
            checkpoint.model, self.vocab_size, self.eos_token_id, self.config, self.n_slots,
            self.device, self.dtype, self.threads,
        )
        self.window_shift = self._core.window_shift
        self.ready = False
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._state = "new"  # new -> running -> draining -> stopped; or -> failed
        self._deadline: float | None = None
        self._inbox: list[Request] = []
        self._aborts: list[tuple[str, int | None]] = []
        self._streams: dict[str, RequestStream] = {}
        self._remaining: dict[str, int] = {}  # choices of a live request still to finish
        self._live: dict[str, set[int]] = {}  # choices that count toward the capacity
        self._num_live = 0
        self._listeners: list[Callable[[EngineStats], None]] = []
        self._stats = EngineStats(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0)
        self._thread: threading.Thread | None = None

    @property
    def capacity(self) -> int:
        """Sequences that may be live at once: one per slot, plus the waiting queue."""
        return self.n_slots + self.config.max_queue

    # ---- the API side (any thread / the event loop) ----------------------------------------

    def validate(self, request: Request) -> None:
        """Raise ``InvalidRequestError`` naming the first bad parameter of ``request``."""
        if not request.prompt_token_ids:
            raise InvalidRequestError("prompt", "the prompt must hold at least one token")
        self.check_token_ids(request.prompt_token_ids, "prompt")
        request.params.validate(self.vocab_size, max_n=self.config.max_n)

    def check_token_ids(self, token_ids: Iterable[int], param: str) -> None:
        """Raise ``InvalidRequestError`` naming ``param`` for the first id outside the
        vocabulary (the one check of token ids: prompts here, ``/detokenize`` in the API)."""
        for token_id in token_ids:
            if not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                raise InvalidRequestError(
                    param, f"{param} token id {token_id!r} is outside [0, {self.vocab_size})"
                )

    def validate_size(self, params: SamplingParams, num_prompts: int) -> None:
        """Raise ``InvalidRequestError`` when ``num_prompts`` prompts sampled with ``params`` ask
        for more sequences than one request may (``max_request_sequences``) or than the engine
        could ever hold. Needs no prompt: callers check it before encoding any."""
        params.validate(self.vocab_size, max_n=self.config.max_n)
        self._check_sequences(num_prompts * params.n, f"{num_prompts} prompt(s) x n={params.n}")

    def _check_sequences(self, wanted: int, shape: str) -> None:
        limit = min(self.config.max_request_sequences, self.capacity)
        if wanted > limit:
            raise InvalidRequestError(
                "n", f"this request asks for {wanted} sequences ({shape}); at most {limit} fit one "
                "request (--max-request-sequences)")

    def add_request(self, request: Request) -> RequestStream:
        """Queue a request from a coroutine; its events arrive on the returned stream."""
        return self.add_requests([request])[0]

    def add_requests(self, requests: list[Request]) -> list[RequestStream]:
        """Queue the prompts of one client request together: all are accepted or none is.

        Raises ``InvalidRequestError`` (a 400) when they ask for more sequences than one request
        may (``max_request_sequences``) or than the engine could ever hold, ``QueueFullError`` (a
        503: retrying can succeed) when they do not fit now, ``EngineStoppedError`` when the
        engine is shutting down or dead.
        """
        loop = asyncio.get_running_loop()
        for request in requests:
            self.validate(request)
        wanted = sum(r.params.n for r in requests)
        if requests:
            self._check_sequences(wanted, f"{len(requests)} prompt(s) x n={requests[0].params.n}")
        streams = [RequestStream(r.request_id, r.params.n, loop, self.abort) for r in requests]
        with self._cond:
            if self._state not in ("new", "running"):
                raise EngineStoppedError(
                    "the engine is shutting down and accepts no new requests"
                    if self._state != "failed" else f"the engine failed: {self.error}")
            for request in requests:
                if request.request_id in self._streams:
                    raise InvalidRequestError(
                        "request_id", f"request id {request.request_id!r} is already in flight"
                    )
            if self._num_live + wanted > self.capacity:
                raise QueueFullError(
                    f"the server is full ({self._num_live} of {self.capacity} sequences live: "
                    f"{self.n_slots} running and a queue of {self.config.max_queue}); retry later"
                )
            for request, stream in zip(requests, streams, strict=True):
                self._streams[request.request_id] = stream
                self._remaining[request.request_id] = request.params.n
                self._live[request.request_id] = set(range(request.params.n))
                self._inbox.append(request)
            self._num_live += wanted
            self._cond.notify()
        return streams

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Cancel a request (or one of its choices) wherever it is; its sequences stop counting
        toward the capacity now, and its slots are free before the next step."""
        with self._cond:
            live = self._live.get(request_id)
            if live is None:
                return
            gone = set(live) if index is None else live & {index}
            if gone:
                live -= gone
                self._num_live -= len(gone)
                self._aborts.append((request_id, index))
                self._cond.notify()

    def stats(self) -> EngineStats:
        return self._stats

    def add_stats_listener(self, fn: Callable[[EngineStats], None]) -> None:
        """``fn(stats)`` is called from the engine thread after every step."""
        self._listeners.append(fn)

    def start(self) -> None:
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
            _ended(outputs, r.request_id, range(r.params.n), reason, len(r.prompt_token_ids))
        try:
            outputs.extend(self._core.abort_all(reason))
        except Exception:  # noqa: BLE001 - the core is broken: end the streams directly
            log.exception("cannot abort the engine core's requests")
            queued = {r.request_id for r in pending}
            with self._cond:
                for rid, live in self._live.items():
                    if rid not in queued:
                        _ended(outputs, rid, sorted(live), reason, 0)
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
        scheduler = self._core.scheduler
        return dataclasses.replace(
            self._stats, num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
            kv_cache_usage=scheduler.slots.usage, batch_size=0, prompt_tokens=0,
            generation_tokens=0, crops=0, recomputed_tokens=0, prefix_cache_queries=0,
            prefix_cache_hits=0,
        )

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

    def _publish(self, stats: EngineStats) -> None:
        self._stats = stats
        for fn in self._listeners:
            try:
                fn(stats)
            except Exception:
                log.exception("engine stats listener failed")

    def _dispatch(self, outputs: TokenEvents) -> None:
        """Hand each live request's rows of ``outputs`` to its stream, and stop counting the
        choices that finished."""
        if not len(outputs):
            return
        by_request: dict[str, list[int]] = {}
        for row, request_id in enumerate(outputs.request_ids):
            rows = by_request.get(request_id)
            if rows is None:
                by_request[request_id] = [row]
            else:
                rows.append(row)
        finishes = outputs.finishes
        items = []
        with self._cond:
            for request_id, rows in by_request.items():
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                items.append((stream, rows))
                if not finishes:
                    continue
                live = self._live[request_id]
                for row in rows:
                    if row in finishes:
                        self._remaining[request_id] -= 1
                        index = outputs.indices[row]
                        if index in live:
                            live.discard(index)
                            self._num_live -= 1
                if self._remaining[request_id] == 0:
                    del self._streams[request_id], self._remaining[request_id]
                    del self._live[request_id]
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, rows in items:
            by_loop.setdefault(stream.loop, []).append((stream, rows))
        for loop, loop_items in by_loop.items():
            put_all(loop, outputs, loop_items)

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


def _ended(events: TokenEvents, request_id: str, indices, reason: FinishReason,
           num_prompt_tokens: int) -> None:
    """Append a token-less finishing event for each choice ``indices`` of a request."""
    for index in indices:
        events.finishes[len(events)] = Finish(reason, num_prompt_tokens)
        events.request_ids.append(request_id)
        events.indices.append(index)
        events.token_ids.append(None)
        events.crops.append(0)
        events.prompt_cropped.append(False)
        events.num_generated.append(0)
        events.cached_tokens.append(0)
        if events.logprobs is not None:
            events.logprobs.append(None)
            events.top_logprobs.append(None)
