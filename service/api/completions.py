"""``/v1/completions``: prompts in, OpenAI ``text_completion`` objects (or chunks) out.

The shared path (admission, engine requests, streaming) is ``service.api.serving.Serving``; this
module turns a ``CompletionRequest`` into prompts and shapes its choices.
"""

from __future__ import annotations

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from service.api import logprobs, sse
from service.api.choices import ChoiceState, Job
from service.api.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    new_id,
)
from service.api.serving import Serving, stream_head


class CompletionServing(Serving):
    """Owns how a ``CompletionRequest`` becomes prompts and how its choices look."""

    async def create(self, body: CompletionRequest, http: HTTPRequest) -> Response:
        engine = self.admit(body)
        params = body.sampling_params(max_tokens=body.max_tokens, logprobs=body.logprobs)
        stop = body.stop_strings()
        prompts = [self._prompt(item, engine) for item in _prompt_items(body.prompt)]
        job = self.submit(
            engine,
            new_id("cmpl"),
            prompts,
            params,
            stop=stop,
            echo=body.echo,
            logprobs=body.logprobs is not None,
        )
        if body.stream:
            return self.stream(job, engine, _Chunks(job), body.include_usage)
        return await self.respond(job, engine, http, _response)

    def _prompt(self, item: str | list[int], engine) -> list[int]:
        if isinstance(item, str):
            return self.encode(engine, item, "prompt")
        return self.check_ids(engine, item, "prompt")


def _prompt_items(prompt) -> list:
    """The prompts of a request: a string or a token-id list is one prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _response(job: Job) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=i,
            text=c.text,
            logprobs=logprobs.legacy(c.entries, job.tokenizer) if c.want_logprobs else None,
            finish_reason=c.finish_reason,
            context_window=c.window,
        )
        for i, c in enumerate(job.choices)
    ]
    return CompletionResponse(
        id=job.id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=job.usage(),
        system_fingerprint=job.system_fingerprint,
    )


class _Chunks:
    """``text_completion`` stream chunks: ``text`` per choice (the echoed prompt first)."""

    def __init__(self, job: Job) -> None:
        self.tokenizer = job.tokenizer
        self.framer = sse.ChunkFramer(stream_head(job, "text_completion"))

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
