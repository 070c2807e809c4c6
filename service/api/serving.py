"""Serving logic for ``/v1/completions``: prompts in, engine requests out, OpenAI shapes back.

``CompletionServing`` validates a request, tokenizes its prompts, submits one engine request per
prompt (each with ``n`` choices), and turns the engine's token events into text through one
``TextStream`` per choice (stop strings, UTF-8 safety) and ``ChoiceState`` (logprobs, usage). A
client disconnect, a timeout or the end of the response aborts whatever is still running, at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from model.tokenizer import TokenizerError
from service.api import sse
from service.api.errors import APIError, not_ready
from service.api.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ContextWindow,
    Logprobs,
    Usage,
    completion_id,
)
from service.api.state import ServerState
from service.engine.types import (
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestOutput,
    SamplingParams,
)
from service.reload import system_fingerprint
from service.text import TextDelta, TextStream

log = logging.getLogger("service.api")
_END = object()


@dataclass
class ChoiceState:
    """One choice's running text, pending logprobs, usage and finish."""

    index: int
    stream: TextStream
    prefix: str = ""  # echoed prompt text
    want_logprobs: bool = False
    logprobs: Logprobs | None = None
    pending: list[tuple[int, float | None, dict[str, float] | None]] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    crops: int = 0  # sliding-window crops so far (engine-reported)
    prompt_cropped: bool = False
    parts: list[str] = field(default_factory=list)
    lp_sent: int = 0  # logprob entries already sent in stream chunks

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def window(self) -> ContextWindow:
        return ContextWindow(prompt_cropped=self.prompt_cropped, crops=self.crops)

    @property
    def has_unsent_logprobs(self) -> bool:
        return self.logprobs is not None and len(self.logprobs.tokens) > self.lp_sent

    def chunk(self, text: str) -> dict:
        """This choice's part of a stream chunk: ``text`` plus logprob entries not yet sent."""
        logprobs = None
        if self.logprobs is not None:
            lp, k = self.logprobs, self.lp_sent
            logprobs = {
                "tokens": lp.tokens[k:],
                "token_logprobs": lp.token_logprobs[k:],
                "top_logprobs": lp.top_logprobs[k:],
                "text_offset": lp.text_offset[k:],
            }
            self.lp_sent = len(lp.tokens)
        out = {
            "index": self.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": self.finish_reason,
        }
        if self.done:
            out["context_window"] = self.window.model_dump()
        return out


@dataclass
class Job:
    """One admitted ``/v1/completions`` call: its engine requests and choices."""

    id: str
    created: int
    model: str
    request_ids: list[str]
    n: int
    prompt_tokens: int
    choices: list[ChoiceState]
    streams: list[AsyncIterator[RequestOutput]]
    finished_requests: set[str] = field(default_factory=set)
    prompt_index: dict[str, int] = field(default_factory=dict)  # engine request id -> prompt
    num_done: int = 0  # finished choices
    system_fingerprint: str | None = None  # which checkpoint served it (service.reload)

    def usage(self) -> Usage:
        completion = sum(c.num_tokens for c in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )


class CompletionServing:
    """Owns the path from a validated ``CompletionRequest`` to its response or SSE stream."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def create(self, body: CompletionRequest, http: HTTPRequest) -> Response:
        state = self.state
        if not state.ready:  # loading, warming up or draining: a balancer should go elsewhere
            state.metrics.reject("not_ready")
            raise not_ready()
        engine = state.engine
        served = state.settings.served_model_name
        if body.model is not None and body.model != served:
            state.metrics.reject("invalid")
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )
        try:
            job = self._submit(body, engine)
        except InvalidRequestError as err:
            state.metrics.reject("invalid")
            raise APIError(400, err.message, param=err.param, code="invalid_value") from None
        except QueueFullError:
            state.metrics.reject("queue_full")
            raise
        except EngineStoppedError:
            state.metrics.reject("not_ready")
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(job, engine, include_usage),
                media_type=sse.MEDIA_TYPE,
                headers=sse.HEADERS,
            )
        return await self._respond(job, engine, http)

    # -- admission -------------------------------------------------------------------------

    def _submit(self, body: CompletionRequest, engine) -> Job:
        stop = body.stop_strings()
        if any(not s for s in stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        if body.stream_options is not None and not body.stream:
            raise InvalidRequestError("stream_options", "stream_options needs stream: true")
        params: SamplingParams = body.sampling_params()
        params.validate(engine.vocab_size, max_n=self.state.settings.max_n)
        prompts = self._prompt_ids(body.prompt, engine)
        cid = completion_id()
        job = Job(
            id=cid,
            created=int(time.time()),
            model=self.state.settings.served_model_name,
            system_fingerprint=system_fingerprint(engine),
            request_ids=[],
            n=params.n,
            prompt_tokens=sum(len(p) for p in prompts),
            choices=[],
            streams=[],
        )
        tokenizer = engine.tokenizer
        try:
            for i, prompt in enumerate(prompts):
                request_id = f"{cid}-{i}"
                stream = engine.add_request(Request(request_id, tuple(prompt), params))
                job.request_ids.append(request_id)
                job.prompt_index[request_id] = i
                job.streams.append(stream)
                self.state.track(request_id, engine)
                self.state.metrics.observe_prompt(len(prompt))
                prefix = tokenizer.decode(list(prompt)) if body.echo else ""
                for j in range(params.n):
                    job.choices.append(
                        ChoiceState(
                            index=i * params.n + j,
                            stream=TextStream(tokenizer, stop),
                            prefix=prefix,
                            want_logprobs=body.logprobs is not None,
                        )
                    )
        except BaseException:
            self._release(job, engine, abort=True, count=False)
            raise
        for choice in job.choices:
            if choice.want_logprobs:
                choice.logprobs = Logprobs()
                if choice.prefix:  # echoed prompt tokens: the engine does not score prompts
                    self._echo_logprobs(choice, prompts[choice.index // params.n], tokenizer)
        return job

    def _prompt_ids(self, prompt, engine) -> list[list[int]]:
        items = (
            [prompt]
            if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
            else list(prompt)
        )
        out: list[list[int]] = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise InvalidRequestError("prompt", "prompt must not be empty")
                try:
                    ids = engine.tokenizer.encode(item)
                except TokenizerError as err:
                    raise InvalidRequestError("prompt", str(err)) from None
            else:
                ids = list(item)
                bad = [t for t in ids if not 0 <= t < engine.vocab_size]
                if bad:
                    raise InvalidRequestError(
                        "prompt",
                        f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})",
                    )
            if not ids:
                raise InvalidRequestError("prompt", "prompt must hold at least one token")
            out.append(ids)
        return out

    @staticmethod
    def _echo_logprobs(choice: ChoiceState, prompt: Sequence[int], tokenizer) -> None:
        offset = 0
        for token_id in prompt:
            text = _token_text(tokenizer, token_id)
            choice.logprobs.tokens.append(text)
            choice.logprobs.token_logprobs.append(None)
            choice.logprobs.top_logprobs.append(None)
            choice.logprobs.text_offset.append(offset)
            offset += len(text)

    # -- engine events -----------------------------------------------------------------------

    def _apply(self, job: Job, out: RequestOutput, engine) -> tuple[ChoiceState, str] | None:
        """Feed one engine event to its choice; returns (choice, new text) or None if ignored."""
        choice = job.choices[job.prompt_index[out.request_id] * job.n + out.index]
        if choice.done:
            return None  # already ended by a stop string; the engine may run a step longer
        choice.crops, choice.prompt_cropped = out.crops, out.prompt_cropped
        text = ""
        if out.token_id is not None:
            choice.num_tokens += 1
            top = None
            if out.top_logprobs is not None:
                top = {
                    _token_text(engine.tokenizer, t.token_id): t.logprob
                    for t in out.top_logprobs
                    if math.isfinite(t.logprob)
                }
            logprob = (
                out.logprob if out.logprob is not None and math.isfinite(out.logprob) else None
            )
            choice.pending.append((out.token_id, logprob, top))
            delta = choice.stream.push(out.token_id)
            text += self._take(choice, delta, engine)
            if delta.stopped:
                self._finish(job, choice, "stop", out, engine)
        if out.finish_reason is not None and not choice.done:
            text += self._take(choice, choice.stream.finish(), engine)
            self._finish(job, choice, out.finish_reason.value, out, engine)
        choice.parts.append(text)
        return choice, text

    def _take(self, choice: ChoiceState, delta: TextDelta, engine) -> str:
        released = choice.pending[: delta.num_tokens]
        del choice.pending[: delta.num_tokens + delta.num_dropped]
        if choice.logprobs is not None:
            base = len(choice.prefix)
            for (token_id, logprob, top), start in zip(released, delta.offsets, strict=True):
                choice.logprobs.tokens.append(_token_text(engine.tokenizer, token_id))
                choice.logprobs.token_logprobs.append(logprob)
                choice.logprobs.top_logprobs.append(top)
                choice.logprobs.text_offset.append(base + start)
        return delta.text

    def _finish(
        self, job: Job, choice: ChoiceState, reason: str, out: RequestOutput, engine
    ) -> None:
        choice.finish_reason = reason
        job.num_done += 1
        self.state.metrics.observe_finished(reason, out.metrics, choice.num_tokens)
        prompt_index = job.prompt_index[out.request_id]
        siblings = job.choices[prompt_index * job.n : (prompt_index + 1) * job.n]
        if all(c.done for c in siblings):
            request_id = job.request_ids[prompt_index]
            if out.finish_reason is None:  # ended by a stop string: free the engine's slots now
                engine.abort(request_id)
            job.finished_requests.add(request_id)
            self.state.untrack(request_id)

    def _release(self, job: Job, engine, *, abort: bool, count: bool = True) -> None:
        """Abort whatever is still running (disconnect, timeout, error) and stop tracking it."""
        for choice in job.choices:
            if count and not choice.done:  # nobody reads its abort event: count the finish here
                choice.finish_reason = "abort"
                self.state.metrics.observe_finished("abort", None, choice.num_tokens)
        for request_id in job.request_ids:
            if request_id not in job.finished_requests:
                if abort:
                    engine.abort(request_id)
                job.finished_requests.add(request_id)
                self.state.untrack(request_id)

    def _events(self, job: Job) -> AsyncIterator[RequestOutput]:
        """All engine events of the job's requests, interleaved as they arrive."""
        return job.streams[0] if len(job.streams) == 1 else self._merged(job)

    async def _merged(self, job: Job) -> AsyncIterator[RequestOutput]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for item in stream:
                    queue.put_nowait(item)
            except Exception as err:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait(err)
            finally:
                queue.put_nowait(_END)

        tasks = [asyncio.create_task(pump(s)) for s in job.streams]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is _END:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    def _all_done(self, job: Job) -> bool:
        return job.num_done == len(job.choices)

    # -- responses --------------------------------------------------------------------------

    async def _collect(self, job: Job, engine) -> None:
        async for out in self._events(job):
            self._apply(job, out, engine)
            if self._all_done(job):
                break

    async def _respond(self, job: Job, engine, http: HTTPRequest) -> Response:
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
            self._release(job, engine, abort=True)
        choices = [
            CompletionChoice(
                index=c.index,
                text=c.prefix + "".join(c.parts),
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                context_window=c.window,
            )
            for c in job.choices
        ]
        return Response(
            CompletionResponse(
                id=job.id,
                created=job.created,
                model=job.model,
                choices=choices,
                usage=job.usage(),
                system_fingerprint=job.system_fingerprint,
            )
            .model_dump_json()
            .encode(),
            media_type="application/json",
        )

    async def _stream(self, job: Job, engine, include_usage: bool) -> AsyncIterator[bytes]:
        frame = sse.ChunkFramer(
            {
                "id": job.id,
                "object": "text_completion",
                "created": job.created,
                "model": job.model,
                "system_fingerprint": job.system_fingerprint,
            }
        )
        completed = False
        try:
            timeout = self.state.settings.request_timeout or None
            async with asyncio.timeout(timeout):
                for c in job.choices:
                    if c.prefix:
                        yield frame.choice(c.chunk(c.prefix))
                async for out in self._events(job):
                    applied = self._apply(job, out, engine)
                    if applied is None:
                        continue
                    choice, text = applied
                    if text or choice.done or choice.has_unsent_logprobs:
                        yield frame.choice(choice.chunk(text))
                    if self._all_done(job):
                        break
            if include_usage:
                yield frame.usage(job.usage().model_dump())
            yield sse.DONE
            completed = True
        except TimeoutError:
            err = APIError(504, "the completion took too long", code="timeout")
            yield sse.event(err.envelope())
            yield sse.DONE
            completed = True
        finally:
            if not completed:  # cancelled by a client disconnect
                self.state.metrics.disconnect()
            self._release(job, engine, abort=True)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


async def _wait_disconnect(http: HTTPRequest) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return
