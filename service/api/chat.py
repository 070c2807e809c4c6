"""``/v1/chat/completions``: a conversation in, OpenAI ``chat.completion`` objects (or chunks) out.

The conversation is rendered into one prompt by the chat template in use
(``service.chat_template``: ``--chat-template``, the checkpoint's own, or the builtin plain-text
one) and then takes the same path as a completion (``service.api.serving.Serving``): the same
sampling fields, ``n``, ``stop`` (plus the template's implied stop strings), ``seed``, usage,
errors and SSE framing. Only the shapes differ: a ``message`` per choice, ``delta`` chunks that
open with the assistant's role, and chat-style logprobs.
"""

from __future__ import annotations

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
from service.api.structured import request_constraint
from service.api.tools import ToolPlan, tool_plan
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
        plan = tool_plan(body.tools, body.tool_choice)
        structured = request_constraint(body)
        if plan is not None:
            if structured is not None:
                raise InvalidRequestError(
                    structured.param, f"{structured.param} cannot be used with a forced "
                    "tool_choice (the tool's parameters are the constraint)")
            structured = plan.constraint
        template = await self._template(engine)
        text = await self._render(body, template, engine)
        prompts = await self.token_ids(engine, [text], "messages")
        want = body.engine_logprobs()
        window = engine.model_config.block_size
        aliases = {"max_tokens": body.length_param, "logprobs": "top_logprobs"}
        try:  # SamplingParams checks its ranges when built: name the field the client sent
            params = body.sampling_params(max_tokens=body.max_new_tokens(window), logprobs=want,
                                          structured=structured)
        except InvalidRequestError as err:
            raise renamed(err, aliases) from None
        stop = tuple(dict.fromkeys(body.stop_strings() + template.stop))
        job = await self.submit(
            engine, new_id("chatcmpl"), prompts, params, stop=stop, logprobs=want is not None,
            aliases=aliases,
        )
        if body.stream:
            return self.stream(job, engine, _Chunks(job, plan), body.include_usage)
        return await self.respond(job, engine, http, lambda job: _response(job, plan))

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


def _message(choice: ChoiceState, plan: ToolPlan | None) -> ChatResponseMessage:
    if plan is None:
        return ChatResponseMessage(content=choice.generated_text)
    return ChatResponseMessage(content=None, tool_calls=plan.calls(choice.generated_text))


def _finish_reason(choice: ChoiceState, plan: ToolPlan | None) -> str | None:
    """vLLM's: a "required" tool choice that completed its calls ends with ``tool_calls``; a
    named one keeps ``stop``, as OpenAI answers a forced function."""
    if plan is not None and plan.mode == "required" and choice.finish_reason == "stop":
        return "tool_calls"
    return choice.finish_reason


def _response(job: Job, plan: ToolPlan | None) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=c.index,
            message=_message(c, plan),
            logprobs=_chat_logprobs(c, c.entries, job.tokenizer),
            finish_reason=_finish_reason(c, plan),
            context_window=ContextWindow(prompt_cropped=c.prompt_cropped, crops=c.crops),
        )
        for c in job.choices
    ]
    return ChatCompletionResponse(
        id=job.id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=Usage(**job.usage().to_dict()),
        system_fingerprint=job.system_fingerprint,
    )


class _Chunks:
    """``chat.completion.chunk`` stream chunks: the role first, then ``delta.content``; with a
    tool plan, ``delta.tool_calls`` instead: a named call's arguments as they arrive (its id and
    name on the first), a "required" choice's calls whole on its last chunk."""

    def __init__(self, job: Job, plan: ToolPlan | None = None) -> None:
        self.tokenizer = job.tokenizer
        self.framer = sse.ChunkFramer(stream_head(job, "chat.completion.chunk"), chat=True)
        self.plan = plan
        self.plain_text = plan is None  # text chunks may take the framer's fast path
        self._opened: set[int] = set()  # choices whose named call has sent its id and name

    def opening(self, choice: ChoiceState) -> dict | None:
        return {
            "index": choice.index,
            "delta": {"role": "assistant", "content": "" if self.plan is None else None},
            "logprobs": None,
            "finish_reason": None,
        }

    def chunk(self, choice: ChoiceState, text: str) -> dict:
        lp = _chat_logprobs(choice, choice.take_entries(), self.tokenizer)
        out = {
            "index": choice.index,
            "delta": self._delta(choice, text),
            "logprobs": None if lp is None else lp.model_dump(),
            "finish_reason": _finish_reason(choice, self.plan),
        }
        window = choice.take_window()
        if window is not None:
            out["context_window"] = window
        return out

    def _delta(self, choice: ChoiceState, text: str) -> dict:
        plan = self.plan
        if plan is None:
            return {"content": text} if text else {}
        if plan.mode == "required":
            if not choice.done:
                return {}
            calls = plan.calls(choice.generated_text)
            return {"tool_calls": [{"index": i, **c.model_dump()} for i, c in enumerate(calls)]}
        if choice.index in self._opened:
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
        self._opened.add(choice.index)
        first = plan.calls(text)[0].model_dump()
        return {"tool_calls": [{"index": 0, **first}]}
