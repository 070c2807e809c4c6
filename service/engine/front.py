"""The API side of an engine, shared by the in-process engine and the engine-core client.

``EngineFront`` admits requests (exact sequence accounting against the slots plus the queue),
keeps each live request's ``RequestStream``, and hands a step's events to those streams
(``dispatch``). How admitted requests and aborts reach the stepping core is the subclass's:
``Engine`` queues them for its own thread, ``CoreClient`` sends them to the engine-core process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch

from model.config import GPTConfig
from model.threads import ThreadPlan
from model.tokenizer import Tokenizer
from service.engine.admission import LiveCount, LocalCount
from service.engine.config import EngineConfig
from service.engine.counters import CoreCounters
from service.engine.grammar import GrammarCompiler
from service.engine.stream import RequestStream, deliver, put_all
from service.engine.types import (
    EngineStats,
    EngineStoppedError,
    Finish,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    Request,
    SamplingParams,
    TokenEvents,
)

log = logging.getLogger(__name__)


class EngineFront(ABC):
    """Admission, streams and dispatch. Read-only attributes: ``tokenizer``, ``model_config``,
    ``vocab_size`` (the tokenizer's), ``eos_token_id``, ``device``, ``dtype``, ``config``,
    ``n_slots``, ``threads`` (the CPU thread plan), ``window_shift`` (in force), ``grammars``
    (the structured-output compiler and cache: the API compiles here, off the event loop),
    ``ready`` (the core has taken its warm-up step and is alive), ``error`` (why it died, if
    it did).

    Admission counts sequences (each choice of each prompt): a request is accepted while every
    live sequence, its own included, fits the slots plus ``max_queue``; an aborted request's
    sequences stop counting at once, not when the core gets to them.
    """

    fatal_on_failure = False  # True: the core's death ends the server (a process core)
    front = 0  # which API-server process this is (``--api-servers N``)
    # the core's cumulative counts for /metrics (service.engine.counters), when this process
    # reads them through its engine (None: it finds them by their folder, or has none)
    counters: CoreCounters | None = None

    def __init__(
        self, tokenizer: Tokenizer, model_config: GPTConfig, config: EngineConfig, *,
        device: torch.device, dtype: torch.dtype, n_slots: int, threads: ThreadPlan,
        window_shift: int, grammars: GrammarCompiler | None = None,
        live: LiveCount | None = None,
    ) -> None:
        self.config = config
        self.grammars = grammars or GrammarCompiler(tokenizer, config.grammar_cache,
                                                    config.max_grammar_bytes)
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.vocab_size = tokenizer.vocab_size
        self.eos_token_id = tokenizer.eot_id
        self.device = device
        self.dtype = dtype
        self.n_slots = n_slots
        self.threads = threads
        self.window_shift = window_shift
        self.ready = False
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._state = "new"  # new -> running -> draining -> stopped; or -> failed
        self._streams: dict[str, RequestStream] = {}
        self._open: dict[str, set[int]] = {}  # choices whose finishing event is not out yet
        self._live: dict[str, set[int]] = {}  # choices that count toward the capacity
        self._prompt_tokens: dict[str, int] = {}  # each live request's prompt length
        # sequences live against the capacity: this front end's alone, or shared by every
        # API-server process of one engine core (service/engine/admission.py)
        self._num_live = live or LocalCount()
        self._listeners: list[Callable[[EngineStats], None]] = []
        self._stats = EngineStats(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0)

    @property
    def capacity(self) -> int:
        """Sequences that may be live at once: one per slot, plus the waiting queue."""
        return self.n_slots + self.config.max_queue

    # ---- validation and admission (any thread / the event loop) ----------------------------

    def validate(self, request: Request) -> None:
        """Raise ``InvalidRequestError`` naming the first bad parameter of ``request``."""
        if not request.prompt_token_ids:
            raise InvalidRequestError("prompt", "the prompt must hold at least one token")
        self.check_token_ids(request.prompt_token_ids, "prompt")
        request.params.validate(self.vocab_size, max_n=self.config.max_n)
        if request.params.structured is not None:  # a cache hit once the API compiled it
            self.grammars.compile(request.params.structured)

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
            full = self._num_live.take(wanted, self.capacity)
            if full is not None:
                raise QueueFullError(
                    f"the server is full ({full} of {self.capacity} sequences live: "
                    f"{self.n_slots} running and a queue of {self.config.max_queue}); retry later"
                )
            try:
                self._submit(requests)  # a core that cannot take them leaves no trace here
            except BaseException:
                self._num_live.give(wanted)
                raise
            for request, stream in zip(requests, streams, strict=True):
                self._streams[request.request_id] = stream
                self._open[request.request_id] = set(range(request.params.n))
                self._live[request.request_id] = set(range(request.params.n))
                self._prompt_tokens[request.request_id] = len(request.prompt_token_ids)
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
                self._num_live.give(len(gone))
                self._submit_abort(request_id, index)

    @abstractmethod
    def _submit(self, requests: list[Request]) -> None:
        """Hand admitted ``requests`` to the core (called holding ``_cond``)."""

    @abstractmethod
    def _submit_abort(self, request_id: str, index: int | None) -> None:
        """Hand an abort to the core (called holding ``_cond``)."""

    # ---- stats -------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return self._stats

    def add_stats_listener(self, fn: Callable[[EngineStats], None]) -> None:
        """``fn(stats)`` is called (on the core's side of this object) after every step (the
        server adds none: its metrics read the core's counts when scraped)."""
        self._listeners.append(fn)

    def _publish(self, stats: EngineStats) -> None:
        self._stats = stats
        for fn in self._listeners:
            try:
                fn(stats)
            except Exception:
                log.exception("engine stats listener failed")

    # ---- events to streams -------------------------------------------------------------------

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
        freed = 0
        with self._cond:
            for request_id, rows in by_request.items():
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                items.append((stream, rows))
                if not finishes:
                    continue
                live, still_open = self._live[request_id], self._open[request_id]
                for row in rows:
                    if row in finishes:
                        index = outputs.indices[row]
                        still_open.discard(index)
                        if index in live:
                            live.discard(index)
                            freed += 1
                if not still_open:
                    del self._streams[request_id], self._open[request_id]
                    del self._live[request_id], self._prompt_tokens[request_id]
            if freed:
                self._num_live.give(freed)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, rows in items:
            by_loop.setdefault(stream.loop, []).append((stream, rows))
        here = running_loop()
        for loop, loop_items in by_loop.items():
            if loop is here:  # on the streams' own loop (it reads a core's socket): no hand-over
                deliver(outputs, loop_items)
            else:
                put_all(loop, outputs, loop_items)

    def _unfinished(self, reason: FinishReason) -> TokenEvents:
        """A finishing event with ``reason`` for every choice of every live request whose end
        has not been handed to its stream (the core cannot say any more: it died)."""
        events = TokenEvents()
        with self._cond:
            for request_id, still_open in self._open.items():
                ended(events, request_id, sorted(still_open), reason,
                      self._prompt_tokens[request_id])
        return events


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def ended(events: TokenEvents, request_id: str, indices, reason: FinishReason,
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
