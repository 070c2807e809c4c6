"""The engine's typed contracts: what a request asks for and what comes back.

These dataclasses are the seam between the HTTP layer and the engine. The engine speaks token ids
only; text, stop strings and JSON live in the API layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import msgspec


class EngineError(Exception):
    """Base class for errors the engine reports to its callers."""


class InvalidRequestError(EngineError, ValueError):
    """A request parameter is out of range; ``param`` names it (the API's 400 ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class QueueFullError(EngineError):
    """The waiting queue is at its bound (the API answers 503 with Retry-After)."""


class EngineStoppedError(EngineError):
    """The engine is draining or stopped and accepts no new work."""


class FinishReason(str, Enum):  # noqa: UP042 (str() of members is part of the contract)
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # eos or a stop token id (the API also uses it for stop strings)
    ABORT = "abort"  # cancelled by the caller or a disconnect
    ERROR = "error"  # the engine failed while running this request


StructuredKind = Literal["json", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on what a request may generate (vLLM's ``StructuredOutputsParams``).

    ``kind``: ``json`` (``spec`` is a JSON schema, canonical JSON text), ``regex``, ``choice``
    (``spec`` is a JSON list of strings) or ``grammar`` (Lark or GBNF). ``param`` names the
    request field it came from, so every error about it (a 400) names that field. Two
    constraints with equal ``kind`` and ``spec`` compile to the same grammar (the cache key).
    """

    kind: StructuredKind
    spec: str
    param: str = "structured_outputs"

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.spec


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. ``temperature`` 0 = greedy. Every range that needs no
    model is checked when the params are built; ``validate`` adds the model's (token ids, n)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1.0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias) pairs
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k in 0..5: chosen token's + top-k
    structured: StructuredOutputs | None = None  # None: unconstrained

    @classmethod
    def create(cls, *, logit_bias: Mapping[int, float] | None = None, **kwargs) -> SamplingParams:
        """Build from keyword arguments, accepting ``logit_bias`` as a mapping."""
        pairs = tuple(sorted((int(k), float(v)) for k, v in (logit_bias or {}).items()))
        stop_ids = tuple(kwargs.pop("stop_token_ids", ()) or ())
        return cls(logit_bias=pairs, stop_token_ids=stop_ids, **kwargs)

    def __post_init__(self) -> None:
        """Raise ``InvalidRequestError`` naming the first bad parameter."""
        _int_range("max_tokens", self.max_tokens, 1, 1_000_000)
        _float_range("temperature", self.temperature, 0.0, 100.0)
        _int_range("top_k", self.top_k, 0, 1_000_000)
        _float_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _float_range("min_p", self.min_p, 0.0, 1.0)
        _float_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float_range("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_open=True)
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise InvalidRequestError("n", f"n must be an integer >= 1, got {self.n!r}")
        if self.logprobs is not None:
            _int_range("logprobs", self.logprobs, 0, 5)
        if self.seed is not None:
            _int_range("seed", self.seed, 0, 2**63 - 1)
        for _, bias in self.logit_bias:
            _float_range("logit_bias", bias, -100.0, 100.0)

    def validate(self, vocab_size: int, max_n: int = 16) -> None:
        """Raise ``InvalidRequestError`` naming the first parameter this model refuses."""
        _int_range("n", self.n, 1, max_n)
        for token_id, _ in self.logit_bias:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(
                    "logit_bias", f"logit_bias token id {token_id} is outside [0, {vocab_size})"
                )
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(
                    "stop_token_ids", f"stop token id {token_id} is outside [0, {vocab_size})"
                )


def _int_range(param: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequestError(param, f"{param} must be an integer in [{low}, {high}], got {value!r}")


def _float_range(
    param: str, value: object, low: float, high: float, *, low_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidRequestError(
            param, f"{param} must be a finite number in {bracket}{low}, {high}], got {value!r}"
        )


@dataclass(frozen=True)
class Request:
    """One generation request: prompt token ids and sampling settings.

    ``group`` names the client request it belongs to (an HTTP request with several prompts
    submits one engine request per prompt, all in one group): admission is fair between groups.
    None: the request is its own group.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    group: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class RequestOutput:
    """One event on a request's stream: a new token of choice ``index``, or its end.

    A finishing event has ``finish_reason`` set and may carry no token (``token_id`` None), e.g. an
    abort. ``crops`` counts the sliding-window crops this choice has needed so far (0 = never
    cropped); ``prompt_cropped`` says the prompt itself was longer than the window.
    """

    request_id: str
    index: int
    token_id: int | None
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    crops: int = 0
    prompt_cropped: bool = False
    metrics: RequestMetrics | None = None  # set on the finishing event
    num_cached_tokens: int = 0  # prompt tokens this choice reused from the prefix cache


@dataclass(frozen=True)
class RequestMetrics:
    """A choice's timings (seconds), reported once when it finishes: nothing per token (the
    core counts the inter-token gaps into ``/metrics`` itself: ``service.engine.counters``)."""

    queue_time: float
    time_to_first_token: float | None  # None: it generated no token
    e2e_latency: float
    num_tokens: int  # tokens it generated


class EngineStats(msgspec.Struct, frozen=True):
    """A snapshot of the engine after a step: its load (``/metrics`` shows the latest one's
    at each scrape) and the step's own work (for stats listeners, tests and benchmarks; the
    ``/metrics`` counters are the core's cumulative ones, ``service.engine.counters``).

    A frozen msgspec struct rather than a frozen dataclass: one is built every step, and a frozen
    dataclass of these twelve fields costs ~4 us to build here (~0.4 us as a struct: a tenth of
    a one-row step); it is also what goes on the wire to the front ends (``wire.OutputCodec``).
    ``msgspec.structs.replace`` copies one with fields changed."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, fraction of slots or blocks in use
    step_time: float  # seconds of the last step
    batch_size: int  # sequences in the last step
    prompt_tokens: int  # window tokens of the prompts admitted in the last step, per choice
    generation_tokens: int  # tokens generated in the last step
    crops: int  # sliding-window crops performed in the last step
    total_steps: int
    recomputed_tokens: int = 0  # window tokens re-encoded after a crop in the last step
    prefix_cache_queries: int = 0  # prompt_tokens, when prefix caching looked them up
    prefix_cache_hits: int = 0  # ...of which a reused prefix held (copied, not computed)


@dataclass(frozen=True)
class Finish:
    """How a choice ended: its reason, counts and timings (one per choice, not per token)."""

    reason: FinishReason
    num_prompt_tokens: int
    metrics: RequestMetrics | None = None


@dataclass(slots=True)
class TokenEvents:
    """Events as columns, never one object per token: event ``i`` is choice ``indices[i]`` of
    request ``request_ids[i]``, with token ``token_ids[i]`` (None: the choice ended without a new
    token, e.g. an abort), the choice's window crops so far, whether its prompt was cropped and
    how many tokens it has generated, and how many of its prompt's tokens came from the prefix
    cache.
    ``logprobs``/``top_logprobs`` are None when no event asked for them; ``finishes`` maps the
    events that end their choice to how it ended.

    The engine core returns one per step; a request's stream collects the events of its own
    choices into one, so a consumer that falls behind takes every event waiting in one read.
    """

    request_ids: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    token_ids: list[int | None] = field(default_factory=list)
    crops: list[int] = field(default_factory=list)
    prompt_cropped: list[bool] = field(default_factory=list)
    num_generated: list[int] = field(default_factory=list)  # the choice's tokens so far
    logprobs: list[float | None] | None = None
    top_logprobs: list[tuple[TokenLogprob, ...] | None] | None = None
    finishes: dict[int, Finish] = field(default_factory=dict)
    # prompt tokens the choice reused from the prefix cache (the API's cached_tokens)
    cached_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) - self.token_ids.count(None)

    def take(self, other: TokenEvents, rows: list[int]) -> None:
        """Append events ``rows`` of ``other`` (in that order)."""
        base = len(self.token_ids)
        if other.logprobs is not None or self.logprobs is not None:
            if self.logprobs is None:
                self.logprobs, self.top_logprobs = [None] * base, [None] * base
            src_lp, src_top = other.logprobs, other.top_logprobs
            self.logprobs.extend(None if src_lp is None else src_lp[r] for r in rows)
            self.top_logprobs.extend(None if src_top is None else src_top[r] for r in rows)
        if len(rows) == 1:  # the common case: one new token of a one-choice request
            r = rows[0]
            self.request_ids.append(other.request_ids[r])
            self.indices.append(other.indices[r])
            self.token_ids.append(other.token_ids[r])
            self.crops.append(other.crops[r])
            self.prompt_cropped.append(other.prompt_cropped[r])
            self.num_generated.append(other.num_generated[r])
            self.cached_tokens.append(other.cached_tokens[r])
        else:
            self.request_ids.extend(other.request_ids[r] for r in rows)
            self.indices.extend(other.indices[r] for r in rows)
            self.token_ids.extend(other.token_ids[r] for r in rows)
            self.crops.extend(other.crops[r] for r in rows)
            self.prompt_cropped.extend(other.prompt_cropped[r] for r in rows)
            self.num_generated.extend(other.num_generated[r] for r in rows)
            self.cached_tokens.extend(other.cached_tokens[r] for r in rows)
        if other.finishes:
            for i, r in enumerate(rows):
                if r in other.finishes:
                    self.finishes[base + i] = other.finishes[r]

    def extend(self, other: TokenEvents) -> None:
        self.take(other, list(range(len(other))))

    @classmethod
    def gather(cls, parts: list[tuple[TokenEvents, list[int]]]) -> TokenEvents:
        """Rows ``rows`` of each ``(events, rows)`` in turn, as one (what ``take`` would build
        one part at a time, a column at a time: a stream's read of every step since its last
        read, where each step gave it a row or two)."""
        if len(parts) == 1:
            events, rows = parts[0]
            if len(rows) == len(events):
                return events  # one step, all of it this stream's (rows are in order)
            if len(rows) == 1:  # one step's token of a one-choice request: a client keeping up
                return events._row(rows[0])
        pairs = [(events, r) for events, rows in parts for r in rows]
        out = cls(
            request_ids=[e.request_ids[r] for e, r in pairs],
            indices=[e.indices[r] for e, r in pairs],
            token_ids=[e.token_ids[r] for e, r in pairs],
            crops=[e.crops[r] for e, r in pairs],
            prompt_cropped=[e.prompt_cropped[r] for e, r in pairs],
            num_generated=[e.num_generated[r] for e, r in pairs],
            cached_tokens=[e.cached_tokens[r] for e, r in pairs],
        )
        if any(events.logprobs is not None for events, _ in parts):
            out.logprobs = [None if e.logprobs is None else e.logprobs[r] for e, r in pairs]
            out.top_logprobs = [None if e.top_logprobs is None else e.top_logprobs[r]
                                for e, r in pairs]
        if any(events.finishes for events, _ in parts):
            out.finishes = {i: e.finishes[r] for i, (e, r) in enumerate(pairs)
                            if r in e.finishes}
        return out

    def _row(self, r: int) -> TokenEvents:
        """Event ``r`` alone (what ``gather`` builds for one row, without its generic loops)."""
        out = TokenEvents([self.request_ids[r]], [self.indices[r]], [self.token_ids[r]],
                          [self.crops[r]], [self.prompt_cropped[r]], [self.num_generated[r]],
                          cached_tokens=[self.cached_tokens[r]])
        if self.logprobs is not None:
            out.logprobs = [self.logprobs[r]]
            out.top_logprobs = [None if self.top_logprobs is None else self.top_logprobs[r]]
        finish = self.finishes.get(r) if self.finishes else None
        if finish is not None:
            out.finishes = {0: finish}
        return out

    def events(self) -> list[RequestOutput]:
        """One ``RequestOutput`` per event (the offline and test API; the server reads columns)."""
        out = []
        for i, token_id in enumerate(self.token_ids):
            finish = self.finishes.get(i)
            out.append(RequestOutput(
                request_id=self.request_ids[i],
                index=self.indices[i],
                token_id=token_id,
                logprob=None if self.logprobs is None else self.logprobs[i],
                top_logprobs=None if self.top_logprobs is None else self.top_logprobs[i],
                finish_reason=None if finish is None else finish.reason,
                num_prompt_tokens=0 if finish is None else finish.num_prompt_tokens,
                num_generated_tokens=self.num_generated[i],
                crops=self.crops[i],
                prompt_cropped=self.prompt_cropped[i],
                num_cached_tokens=self.cached_tokens[i],
                metrics=None if finish is None else finish.metrics,
            ))
        return out
