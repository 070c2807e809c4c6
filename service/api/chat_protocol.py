"""``/v1/chat/completions`` on the wire: OpenAI's chat request, response and logprob shapes.

The sampling fields are ``GenerationRequest``'s (shared with ``/v1/completions``, structured
outputs among them). ``tools`` with a forced ``tool_choice`` are structured outputs too
(``service.api.tools``); the deprecated ``functions`` / ``function_call`` are declared so that a
request using them gets a clear 400 instead of being silently ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictInt, StrictStr

from service.api.protocol import (
    ContextWindow,
    FinishReason,
    GenerationRequest,
    OpenAIModel,
    Usage,
)
from service.api.tools import ToolCall
from service.engine.types import InvalidRequestError

Role = Literal["system", "developer", "user", "assistant"]


class ContentPart(OpenAIModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is supported."""

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(OpenAIModel):
    role: Role
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    def text(self, index: int) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    "messages",
                    f"messages[{index}].content: a {part.type!r} part is not supported; "
                    "this model takes text only",
                )
            texts.append(part.text)
        return "\n".join(texts)


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``: OpenAI's chat request (sampling fields shared)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="the conversation, rendered into one prompt by the chat template"
    )
    max_completion_tokens: StrictInt | None = Field(
        None, description="tokens to generate (default: the model's context window)"
    )
    max_tokens: StrictInt | None = Field(None, description="older name of max_completion_tokens")
    logprobs: bool = Field(False, description="return each generated token's log-probability")
    top_logprobs: StrictInt | None = Field(
        None, description="alternatives per token, 0..5 (needs logprobs: true)"
    )
    tools: list[Any] | None = Field(None, description="functions the model may be made to call")
    tool_choice: Any = Field(
        None, description='"none", "required" or {"type": "function", "function": {"name": ...}}'
        ' ("auto" needs a chat template with a tool format)')
    functions: list[Any] | None = Field(None, description="refused when non-empty: use tools")
    function_call: Any = Field(None, description='only "none" is accepted: use tool_choice')

    def max_new_tokens(self, window: int) -> int:
        """``max_completion_tokens`` (or the older ``max_tokens``), else one context window
        (the engine checks the range; its errors name ``length_param``)."""
        for param in ("max_completion_tokens", "max_tokens"):
            value = getattr(self, param)
            if value is not None:
                return value
        return window

    @property
    def length_param(self) -> str:
        """The field the client gave the length in (errors name it)."""
        return "max_tokens" if self.max_tokens is not None and self.max_completion_tokens is None \
            else "max_completion_tokens"

    def engine_logprobs(self) -> int | None:
        """The engine's ``logprobs`` (None: none; k: the chosen token's plus the top k)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "top_logprobs needs logprobs: true")
        if not self.logprobs:
            return None
        return self.top_logprobs or 0  # the engine checks the range (as its ``logprobs``)

    def refuse_unsupported(self) -> None:
        """400 for OpenAI's deprecated function-calling fields, rather than ignoring them."""
        if self.functions:
            raise InvalidRequestError("functions", "functions is not supported; use tools")
        if self.function_call not in (None, "none"):
            raise InvalidRequestError(
                "function_call", 'function_call is not supported; use tools and tool_choice')


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the choice is tool calls
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    context_window: ContextWindow | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
