"""``/v1/chat/completions``: a conversation in, OpenAI ``chat.completion`` objects (or chunks) out.

The conversation is rendered into one prompt by the chat template in use
(``service.chat_template``: ``--chat-template``, the checkpoint's own, or the builtin plain-text
one) and then takes the same path as a completion (``service.api.serving.Serving``): the same
sampling fields, ``n``, ``stop`` (plus the template's implied stop strings), ``seed``, usage,
errors and SSE framing. Only the shapes differ: a ``message`` per choice, ``delta`` chunks that
open with the assistant's role, and chat-style logprobs.
"""

from __future__ import annotations

from dataclasses import asdict

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from service.api import logprobs, sse
from service.api.chat_protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
)
from service.api.errors import APIError
from service.api.protocol import ContextWindow, Usage, new_id
from service.api.serving import Serving, renamed, stream_head
from service.api.state import ServerState
from service.chat_template import ChatTemplate, ChatTemplates, TemplateError
from service.choices import ChoiceState, Job
from service.engine.types import InvalidRequestError


class ChatServing(Serving):
    """Owns how a ``ChatCompletionRequest`` becomes a prompt and how its choices look."""

    def __init__(self, state: ServerState, templates: ChatTemplates) -> None:
        super().__init__(state)
        self.templates = templates

    async def create(self, body: ChatCompletionRequest, http: HTTPRequest) -> Response:
        engine = self.admit(body, http)
        body.refuse_unsupported()
        template = await self._template(engine)
        text = await self._render(body, template, engine)
        prompts = await self.token_ids(engine, [text], "messages")
        want = body.engine_logprobs()
        window = engine.model_config.block_size
        aliases = {"max_tokens": body.length_param, "logprobs": "top_logprobs"}
        try:  # SamplingParams checks its ranges when built: name the field the client sent
            params = body.sampling_params(max_tokens=body.max_new_tokens(window), logprobs=want)
        except InvalidRequestError as err:
            raise renamed(err, aliases) from None
        stop = tuple(dict.fromkeys(body.stop_strings() + template.stop))
        job = await self.submit(
            engine, new_id("chatcmpl"), prompts, params, stop=stop, logprobs=want is not None,
            aliases=aliases,
        )
        if body.stream:
            return self.stream(job, engine, _Chunks(job), body.include_usage)
        return await self.respond(job, engine, http, _response)

    async def _template(self, engine) -> ChatTemplate:
        try:
            return await self.templates.for_engine(engine)
        except TemplateError as err:  # the checkpoint's own template is unusable: our fault
            raise APIError(500, str(err), code="chat_template_error") from None

    async def _render(self, body: ChatCompletionRequest, template: ChatTemplate, engine) -> str:
        messages = []
        for i, message in enumerate(body.messages):
            item = {"role": message.role, "content": message.text(i)}
            if message.name is not None:
                item["name"] = message.name
            messages.append(item)
        eos_id = engine.eos_token_id
        eos = "" if eos_id is None else engine.tokenizer.decode([eos_id])
        try:
            return await self.templates.render(template, messages, eos_token=eos)
        except TemplateError as err:
            raise InvalidRequestError("messages", str(err)) from None


def _chat_logprobs(choice: ChoiceState, entries, tokenizer) -> ChatLogprobs | None:
    if not choice.want_logprobs:
        return None
    return ChatLogprobs(content=logprobs.chat(entries, tokenizer))


def _response(job: Job) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=c.index,
            message=ChatResponseMessage(content=c.generated_text),
            logprobs=_chat_logprobs(c, c.entries, job.tokenizer),
            finish_reason=c.finish_reason,
            context_window=ContextWindow(**asdict(c.window)),
        )
        for c in job.choices
    ]
    return ChatCompletionResponse(
        id=job.id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=Usage(**asdict(job.usage())),
        system_fingerprint=job.system_fingerprint,
    )


class _Chunks:
    """``chat.completion.chunk`` stream chunks: the role first, then ``delta.content``."""

    def __init__(self, job: Job) -> None:
        self.tokenizer = job.tokenizer
        self.framer = sse.ChunkFramer(stream_head(job, "chat.completion.chunk"), chat=True)

    def opening(self, choice: ChoiceState) -> dict | None:
        return {
            "index": choice.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def chunk(self, choice: ChoiceState, text: str) -> dict:
        lp = _chat_logprobs(choice, choice.take_entries(), self.tokenizer)
        out = {
            "index": choice.index,
            "delta": {"content": text} if text else {},
            "logprobs": None if lp is None else lp.model_dump(),
            "finish_reason": choice.finish_reason,
        }
        window = choice.take_window()
        if window is not None:
            out["context_window"] = window
        return out
