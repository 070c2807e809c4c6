"""``/v1/completions``: prompts in, OpenAI ``text_completion`` objects (or chunks) out.

The shared path (admission, engine requests, streaming) is ``service.api.serving.Serving``; this
module turns a ``CompletionRequest`` into prompts and shapes its choices. ``best_of`` runs
``best_of`` candidates per prompt in the engine (each a sequence, counted against ``--max-n`` and
in ``usage``) and returns the ``n`` with the highest cumulative log-probability, as OpenAI
describes it; ``suffix`` (insertion) is refused.
"""

from __future__ import annotations

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from service.api import logprobs, sse
from service.api.errors import APIError
from service.api.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ContextWindow,
    Usage,
    new_id,
)
from service.api.serving import Serving, renamed, stream_head
from service.api.structured import request_constraint
from service.choices import ChoiceState, Job
from service.engine.types import InvalidRequestError


class CompletionServing(Serving):
    """Owns how a ``CompletionRequest`` becomes prompts and how its choices look."""

    async def create(self, body: CompletionRequest, http: HTTPRequest) -> Response:
        engine = self.admit(body, http)
        if body.suffix:
            raise APIError(
                400,
                "suffix: insertion (text after the completion) is not supported by this model",
                param="suffix",
                code="unsupported_parameter",
            )
        candidates = self._candidates(body)
        # best_of ranks candidates by their total logprob: ask the engine for it (k = 0 gives
        # the chosen token's logprob and no alternatives)
        want = body.logprobs if body.logprobs is not None else (0 if candidates > body.n else None)
        stop = body.stop_strings()
        items = _prompt_items(body.prompt)
        aliases = {"n": "best_of"} if candidates != body.n else {}  # the engine's n is best_of
        try:  # SamplingParams checks its ranges when built
            params = body.sampling_params(max_tokens=body.max_tokens, n=candidates,
                                          logprobs=want, structured=request_constraint(body))
            engine.validate_size(params, len(items))  # before encoding any of them
        except InvalidRequestError as err:
            raise renamed(err, aliases) from None
        prompts = await self.token_ids(engine, items, "prompt")
        job = await self.submit(
            engine,
            new_id("cmpl"),
            prompts,
            params,
            stop=stop,
            echo=body.echo,
            logprobs=body.logprobs is not None,
            aliases=aliases,
        )
        if body.stream:
            return self.stream(job, engine, _Chunks(job), body.include_usage)
        return await self.respond(job, engine, http, lambda job: _response(job, body.n))

    def _candidates(self, body: CompletionRequest) -> int:
        """Sequences per prompt in the engine: ``best_of`` when given, else ``n`` (the engine
        checks that range, as its ``n``; here only how the two relate)."""
        if body.best_of is None or body.best_of == body.n:
            return body.n
        if body.n < 1:
            raise InvalidRequestError("n", f"n must be at least 1, got {body.n}")
        if body.best_of < body.n:
            raise InvalidRequestError(
                "best_of", f"best_of must be at least n ({body.n}), got {body.best_of}"
            )
        if body.stream:
            raise InvalidRequestError("best_of", "best_of > n cannot be used with stream: true")
        return body.best_of


def _prompt_items(prompt) -> list:
    """The prompts of a request: a string or a token-id list is one prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _best(job: Job, n: int) -> list[ChoiceState]:
    """Per prompt, the ``n`` candidates with the highest cumulative logprob (ties: lower index)."""
    if job.n == n:
        return job.choices
    chosen: list[ChoiceState] = []
    for start in range(0, len(job.choices), job.n):
        candidates = job.choices[start : start + job.n]
        chosen += sorted(candidates, key=lambda c: -c.cumulative_logprob)[:n]
    return chosen


def _response(job: Job, n: int) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=i,
            text=c.text,
            logprobs=logprobs.legacy(c.entries, job.tokenizer) if c.want_logprobs else None,
            finish_reason=c.finish_reason,
            context_window=ContextWindow(prompt_cropped=c.prompt_cropped, crops=c.crops),
        )
        for i, c in enumerate(_best(job, n))
    ]
    return CompletionResponse(
        id=job.id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=Usage(**job.usage().to_dict()),  # every candidate's tokens, as OpenAI bills best_of
        system_fingerprint=job.system_fingerprint,
    )


class _Chunks:
    """``text_completion`` stream chunks: ``text`` per choice (the echoed prompt first)."""

    def __init__(self, job: Job) -> None:
        self.tokenizer = job.tokenizer
        self.framer = sse.ChunkFramer(stream_head(job, "text_completion"))
        self.plain_text = True  # text chunks may take the framer's fast path

    def opening(self, choice: ChoiceState) -> dict | None:
        return self.chunk(choice, choice.prefix) if choice.prefix else None

    def chunk(self, choice: ChoiceState, text: str) -> dict:
        lp = None
        if choice.want_logprobs:
            lp = logprobs.legacy(choice.take_entries(), self.tokenizer).model_dump()
        out = {
            "index": choice.index,
            "text": text,
            "logprobs": lp,
            "finish_reason": choice.finish_reason,
        }
        window = choice.take_window()
        if window is not None:
            out["context_window"] = window
        return out
