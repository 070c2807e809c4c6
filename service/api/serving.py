"""The serving path both generation endpoints share: admission, engine requests, answers.

``Serving`` checks readiness and the model name, turns text into token ids, submits one engine
request per prompt (each with ``n`` choices), folds the engine's token events into choices with
``service.choices.Job`` (every event waiting on a request's stream in one read: a stream that
falls behind sends one SSE event per choice carrying all its new tokens), and answers with one
JSON response or an SSE stream. What differs
between ``/v1/completions`` and ``/v1/chat/completions`` (how a request becomes prompts, the shape
of a choice and of a stream chunk) lives in ``service.api.completions`` and ``service.api.chat``;
the stream's per-chunk shape comes in as a ``ChunkShape``. A client disconnect, a timeout, or the
end of the response aborts whatever is still running in the engine, at once. Refusals raise
(``APIError``, ``InvalidRequestError``, the engine's typed errors); the app's error handlers
answer and count them. When the job ends, its token counts and time to first token go to the
access log's record for the request (``request.state.access``, ``service.api.access``).

The engine validates (token ids, sampling ranges, how many sequences fit a request); the API only
renames a parameter where its client sent it under another name. Work that grows with the
request (encoding big prompts, building an echoed prompt's logprobs, the JSON of a big response)
runs in a worker thread past ``OFFLOAD_SIZE`` tokens or characters, so the event loop keeps
answering other clients (``/health`` among them) meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from pydantic import BaseModel
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from model.tokenizer import TokenizerError
from service.api import sse
from service.api.errors import APIError, not_ready
from service.api.protocol import GenerationRequest
from service.api.state import ServerState
from service.api.structured import compile_constraint
from service.choices import ChoiceState, Echo, Job, Update
from service.engine.stream import MergedStreams
from service.engine.types import InvalidRequestError, Request, SamplingParams, TokenEvents
from service.text import encode_text

log = logging.getLogger("service.api")
OFFLOAD_SIZE = 16_384  # tokens or characters past which request work leaves the event loop
T = TypeVar("T")


async def offload(size: int, fn: Callable[..., T], *args) -> T:
    """``fn(*args)``: inline when ``size`` is small, else in a worker thread (the loop serves)."""
    if size <= OFFLOAD_SIZE:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


class ChunkShape(Protocol):
    """How one endpoint shapes a choice's stream chunks (a dict, framed by ``sse``)."""

    framer: sse.ChunkFramer
    plain_text: bool  # a choice's plain text chunks may take the framer's fast path

    def opening(self, choice: ChoiceState) -> dict | None:
        """The choice's first chunk, sent before any token (None: none)."""

    def chunk(self, choice: ChoiceState, text: str) -> dict:
        """A chunk with ``text``, the choice's unsent logprobs, window and finish."""


class Serving:
    """Owns the path from a validated generation request to its response or SSE stream."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.started = time.perf_counter()  # the handler's start (one Serving per request)
        self._access = None  # the access log's record of this request

    # -- admission -------------------------------------------------------------------------

    def admit(self, body: GenerationRequest, http: HTTPRequest):
        """The engine to run ``body`` on, once the server is ready and the model is ours."""
        self._access = getattr(http.state, "access", None)
        state = self.state
        if not state.ready:  # loading, warming up or draining: a balancer should go elsewhere
            raise not_ready(state.not_ready_reason())
        served = state.settings.served_model_name
        if body.model is not None and body.model != served:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )
        ignored = body.ignored_fields()
        if ignored:  # accepted and ignored, as vLLM does; names only (values may be private)
            shown = ", ".join(repr(name[:64]) for name in ignored[:10])
            more = f" (+{len(ignored) - 10} more)" if len(ignored) > 10 else ""
            log.warning("ignoring unknown request field(s): %s%s", shown, more)
        return state.engine

    async def token_ids(
        self, engine, items: Sequence[str | Sequence[int]], param: str
    ) -> list[tuple[int, ...]]:
        """Each item's token ids (texts encoded, id lists as given: the engine checks them); 400
        naming ``param`` if a text is empty or cannot be encoded."""
        size = sum(len(item) for item in items)
        return await offload(size, lambda: [_ids(engine, item, param) for item in items])

    async def submit(
        self,
        engine,
        job_id: str,
        prompts: list[tuple[int, ...]],
        params: SamplingParams,
        *,
        stop: tuple[str, ...],
        echo: bool = False,
        logprobs: bool = False,
        aliases: Mapping[str, str] | None = None,
    ) -> Job:
        """Queue one engine request per prompt; all or none are admitted. The engine validates;
        ``aliases`` renames the parameter of its error to the one the client sent."""
        echoes: list[Echo | None] = [None] * len(prompts)
        if echo:
            echoes = await offload(sum(map(len, prompts)), lambda: [
                Echo.of(prompt, engine.tokenizer, logprobs=logprobs) for prompt in prompts])
        job = Job(
            id=job_id,
            created=int(time.time()),
            model=self.state.settings.served_model_name,
            n=params.n,
            tokenizer=engine.tokenizer,
            system_fingerprint=self.state.fingerprint(engine),
        )
        # one group: the engine admits all prompts or none, and shares slots fairly between
        # this call and other clients' (not between its own prompts)
        requests = [Request(f"{job_id}-{i}", prompt, params, group=job_id)
                    for i, prompt in enumerate(prompts)]
        if params.structured is not None:  # compiled (or found cached) off the event loop
            await compile_constraint(engine, params.structured)
        try:
            streams = engine.add_requests(requests)
        except InvalidRequestError as err:
            raise renamed(err, aliases or {}) from None
        for request, stream, echoed in zip(requests, streams, echoes, strict=True):
            self.state.track(request.request_id, engine)
            job.add_prompt(request.request_id, stream, request.prompt_token_ids, stop=stop,
                           echo=echoed, logprobs=logprobs)
            self.state.metrics.observe_prompt(len(request.prompt_token_ids))
        return job

    # -- engine events -----------------------------------------------------------------------

    def _apply(self, job: Job, events: TokenEvents, engine, rows: list[int] | None = None
               ) -> list[Update]:
        """Fold one read of a request's events (``rows`` of them; None: all) into the job;
        record finishes, free engine work at once (a stop string ends a choice here, before
        the engine knows)."""
        updates = job.apply(events, rows)
        for update in updates:
            if job.first_token_at is None and update.num_tokens:
                job.first_token_at = time.perf_counter()
            if update.finished:
                choice = update.choice
                self.state.metrics.observe_finished(choice.finish_reason, choice.num_tokens)
                if update.stopped_early:  # a stop string ended it: free its slot now
                    engine.abort(update.request_id, update.engine_index)
            if update.request_done:
                self.state.untrack(update.request_id)
        return updates

    def _release(self, job: Job, engine, *, count: bool = True) -> None:
        """Abort whatever is still running (disconnect, timeout, error) and stop tracking it."""
        for choice in job.choices:
            if count and not choice.done:  # nobody reads its abort event: count the finish here
                job.finish(choice, "abort")
                self.state.metrics.observe_finished("abort", choice.num_tokens)
        for request_id in job.request_ids:
            if request_id not in job.finished_requests:
                engine.abort(request_id)
                job.finished_requests.add(request_id)
                self.state.untrack(request_id)
        if count and self._access is not None:
            self._access.prompt_tokens = job.prompt_tokens
            self._access.completion_tokens = job.completion_tokens
            if job.first_token_at is not None:
                self._access.time_to_first_token = job.first_token_at - self.started

    # -- answers ----------------------------------------------------------------------------

    async def respond(
        self, job: Job, engine, http: HTTPRequest, build: Callable[[Job], BaseModel]
    ) -> Response:
        """Run ``job`` to its end and answer ``build(job)`` as JSON (499 if the client left)."""
        timeout = self.state.settings.request_timeout or None
        work = asyncio.create_task(asyncio.wait_for(self._collect(job, engine), timeout))
        gone = asyncio.create_task(_wait_disconnect(http))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client went away first
                work.cancel()
                self.state.metrics.disconnect()
                return Response(status_code=499)
            try:
                work.result()
            except TimeoutError:
                raise APIError(
                    504,
                    f"the completion took longer than {self.state.settings.request_timeout}s",
                    code="timeout",
                ) from None
        finally:
            gone.cancel()
            work.cancel()
            self._release(job, engine)
        if any(c.finish_reason == "error" for c in job.choices):
            raise APIError(
                500,
                "the engine failed while running this request; see the server log",
                code="engine_error",
            )
        size = job.usage().total_tokens
        body = await offload(size, lambda: build(job).model_dump_json().encode())
        return Response(body, media_type="application/json")

    async def _collect(self, job: Job, engine) -> None:
        reader = _reader(job)
        try:
            while (events := await reader.next_batch()) is not None:
                self._apply(job, events, engine)
                if job.all_done:
                    break
        finally:
            _close(reader)

    def stream(self, job: Job, engine, shape: ChunkShape, include_usage: bool) -> Response:
        lane = None
        if len(job.streams) == 1:  # one prompt: its stream's tokens can be written at once
            lane = sse.Lane(job.streams[0], lambda events, rows: self._chunks(
                job, events, engine, shape, rows), lambda: job.all_done)
        return sse.EventStreamResponse(self._stream(job, engine, shape, include_usage, lane),
                                       lane)

    def _chunks(self, job: Job, events: TokenEvents, engine, shape: ChunkShape,
                rows: list[int] | None = None) -> list[bytes]:
        """Fold one read of the job's events (``rows`` of them; None: all) into it: one SSE
        event per choice that has something to say."""
        frame = shape.framer
        chunks = []
        for update in self._apply(job, events, engine, rows):
            choice, text = update.choice, update.text
            if (choice.done or choice.want_logprobs or choice.window_moved
                    or not shape.plain_text):
                if text or choice.done or choice.has_unsent_logprobs or choice.window_moved:
                    chunks.append(frame.choice(shape.chunk(choice, text)))
            elif text:  # the hot path
                chunks.append(frame.text(choice.index, text))
        return chunks

    async def _stream(
        self, job: Job, engine, shape: ChunkShape, include_usage: bool, lane: sse.Lane | None
    ) -> AsyncIterator[bytes]:
        frame = shape.framer
        reader = _reader(job)
        completed = False
        try:
            timeout = self.state.settings.request_timeout or None
            async with asyncio.timeout(timeout):
                for c in job.choices:
                    first = await offload(len(c.entries) + len(c.prefix), shape.opening, c)
                    if first is not None:
                        yield frame.choice(first)
                tail: list[bytes] = []  # the last read's chunks: they go out with the end
                while True:
                    if lane is None:
                        events = await reader.next_batch()
                        chunks = []
                    else:  # while it waits here, the lane writes each token as it comes
                        lane.parked = True
                        try:
                            events = await reader.next_batch()
                        finally:
                            lane.parked = False
                        chunks = lane.take()  # what the lane made but could not write
                    if events is None:
                        tail = chunks
                        break
                    # every token that arrived since the last read: one event per choice
                    chunks += self._chunks(job, events, engine, shape)
                    if job.all_done:
                        tail = chunks
                        break
                    if chunks:
                        yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if include_usage:
                tail.append(frame.usage(job.usage().to_dict()))
            tail.append(sse.DONE)
            completed = True  # before the yield: the response closes this generator there
            yield b"".join(tail)  # the last token, usage and [DONE]: one write with the end
        except TimeoutError:
            err = APIError(504, "the completion took too long", code="timeout")
            completed = True
            yield sse.event(err.envelope()) + sse.DONE
        finally:
            if lane is not None:
                lane.close()
            _close(reader)
            if not completed:  # cancelled by a client disconnect
                self.state.metrics.disconnect()
            self._release(job, engine)


def _ids(engine, item: str | Sequence[int], param: str) -> tuple[int, ...]:
    if not isinstance(item, str):
        return tuple(item)
    if not item:
        raise InvalidRequestError(param, f"{param} must not be empty")
    try:
        ids = encode_text(engine.tokenizer, item)
    except TokenizerError as err:
        raise InvalidRequestError(param, str(err)) from None
    if not ids:
        raise InvalidRequestError(param, f"{param} must hold at least one token")
    return tuple(ids)


def renamed(err: InvalidRequestError, aliases: Mapping[str, str]) -> InvalidRequestError:
    """``err`` naming the parameter as the client sent it (``aliases``: engine name -> API
    name), e.g. chat's ``max_completion_tokens`` for the engine's ``max_tokens``."""
    alias = aliases.get(err.param)
    if alias is None:
        return err
    message = err.message
    if message.startswith(err.param):
        message = alias + message[len(err.param):]
    return InvalidRequestError(alias, message)


def stream_head(job: Job, obj: str) -> dict:
    """The fields every chunk of ``job``'s stream repeats."""
    return {
        "id": job.id,
        "object": obj,
        "created": job.created,
        "model": job.model,
        "system_fingerprint": job.system_fingerprint,
    }


async def _wait_disconnect(http: HTTPRequest) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def _reader(job: Job):
    """What reads the job's engine events: ``next_batch()`` gives every event waiting on one of
    its requests' streams (None once all have ended). A one-prompt job reads its stream itself
    (the per-token path: no task or queue between); several prompts' streams are merged."""
    return job.streams[0] if len(job.streams) == 1 else MergedStreams(job.streams)


def _close(reader) -> None:
    if isinstance(reader, MergedStreams):
        reader.close()
