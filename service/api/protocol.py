"""The OpenAI-compatible wire format shared by both endpoints, and ``/v1/completions``'s own.

Known fields are validated strictly (no string-to-number coercion, no NaN/Infinity); unknown
fields are accepted and ignored with a warning in the log, as vLLM does (``OpenAIModel``).
``GenerationRequest`` holds the sampling fields that completions and chat share and converts them
into the engine's ``SamplingParams``; the engine re-validates ranges. The chat shapes live in
``service.api.chat_protocol``. Extension fields beyond OpenAI's shape are documented in
docs/API.md (``context_window`` on each choice, ``chat_template`` on the model card).
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from service.engine.types import InvalidRequestError, SamplingParams, StructuredOutputs

Number = StrictInt | StrictFloat
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]
FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]


class OpenAIModel(BaseModel):
    """A request model: strict on the fields it declares, unknown fields kept aside and ignored
    (OpenAI's API and vLLM accept them; the serving layer logs their names)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class StructuredOutputsRequest(OpenAIModel):
    """vLLM's ``structured_outputs`` request field (its ``StructuredOutputsParams``): one of
    ``json``, ``regex``, ``choice``, ``grammar``, ``json_object`` (``service.api.structured``)."""

    json_: dict[str, Any] | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None
    # vLLM's options: JSON is always written without free whitespace and objects that list
    # their properties are closed (service.api.structured.closed), so disable_any_whitespace and
    # disable_additional_properties are what happens anyway; the other two are refused
    disable_any_whitespace: StrictBool = False
    disable_additional_properties: StrictBool = False
    whitespace_pattern: StrictStr | None = None
    structural_tag: StrictStr | None = None


class GenerationRequest(OpenAIModel):
    """The sampling fields completions and chat share (OpenAI's, plus vLLM's top_k, min_p and
    repetition_penalty)."""

    model: StrictStr | None = Field(None, description="must equal the served model's id")
    temperature: Number = Field(1.0, description="0 is greedy")
    top_p: Number = Field(1.0, description="nucleus sampling mass in (0, 1]; 1 = off")
    top_k: StrictInt = Field(0, description="keep the k most likely tokens; 0 = off")
    min_p: Number = Field(0.0, description="drop tokens below min_p * the top probability")
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = Field(
        None, description="stop strings, matched across token boundaries, never emitted"
    )
    seed: StrictInt | None = Field(None, description="reproducible sampling, alone or batched")
    n: StrictInt = Field(1, description="choices per prompt")
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    repetition_penalty: Number = 1.0
    logit_bias: dict[StrictStr, Number] | None = None
    user: StrictStr | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # structured outputs (service.api.structured): OpenAI's, vLLM's, and vLLM's older fields
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": ...}')
    structured_outputs: StructuredOutputsRequest | None = Field(
        None, description="vLLM's: one of json, regex, choice, grammar, json_object")
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not s for s in stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        return stop

    def sampling_params(
        self, *, max_tokens: int, n: int | None = None, logprobs: int | None = None,
        structured: StructuredOutputs | None = None,
    ) -> SamplingParams:
        """The engine's view (``n`` defaults to the request's); ``logit_bias`` keys must be
        token ids (strings of integers)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options", "stream_options needs stream: true")
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            bias[_token_key(key)] = float(value)
        return SamplingParams.create(
            max_tokens=max_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=self.top_k,
            min_p=float(self.min_p),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            logit_bias=bias,
            seed=self.seed,
            n=self.n if n is None else n,
            logprobs=logprobs,
            structured=structured,
        )


def _token_key(key: str) -> int:
    """A token id from a ``logit_bias`` key: ASCII decimal digits only (``int()`` would also
    take ``" 5 "``, ``"1_0"`` and ``"٥"``)."""
    if not (key.isascii() and key.isdigit()):
        raise InvalidRequestError(
            "logit_bias", f"logit_bias keys must be token ids (decimal digits), got {key[:32]!r}"
        )
    return int(key)


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: OpenAI's legacy completions request."""

    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="text, texts, token ids, or lists of token ids; never empty")
    max_tokens: StrictInt = Field(16, description="tokens to generate (may run past the window)")
    logprobs: StrictInt | None = Field(None, description="top-k log-probabilities per token, 0..5")
    echo: bool = Field(False, description="prepend the prompt to the text")
    best_of: StrictInt | None = Field(
        None, description="candidates per prompt; the n with the highest total logprob return"
    )
    suffix: StrictStr | None = Field(None, description="refused: insertion is not supported")


class TokenizeRequest(OpenAIModel):
    model: StrictStr | None = None
    prompt: StrictStr


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(OpenAIModel):
    model: StrictStr | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class Logprobs(BaseModel):
    """OpenAI's legacy completions logprobs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ContextWindow(BaseModel):
    """Extension: whether the sliding window cropped this choice's context."""

    prompt_cropped: bool = False  # the prompt was longer than the window: its start was dropped
    crops: int = 0  # window slides during generation (0: the model always saw everything)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: FinishReason | None = None
    context_window: ContextWindow | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache (--prefix-caching)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def new_id(prefix: str) -> str:
    """A fresh object id: ``prefix``, then 128 random bits as 32 hex digits (a uuid4's shape;
    ``os.urandom`` directly: a quarter of ``uuid.uuid4``'s cost, and every request makes one)."""
    return f"{prefix}-{os.urandom(16).hex()}"


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    # which checkpoint served the request: changes when a new checkpoint goes live
    system_fingerprint: str | None = None


class ChatTemplateCard(BaseModel):
    """Extension: the chat template ``/v1/chat/completions`` renders messages with."""

    origin: str  # "builtin", "--chat-template", or the checkpoint file it came from
    template: str | None = None  # the Jinja2 source
    stop: list[str] = Field(default_factory=list)  # stop strings the template implies
    error: str | None = None  # the checkpoint's template could not be used: chat answers 500


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptserve"
    max_model_len: int
    # gptserve extensions: the live checkpoint and its provenance (iteration, val_loss, ...),
    # the chat template in use, and the served precision: the activations' dtype ("float32",
    # "bfloat16", "float16") and the weights' quantization ("int8"; None: the weights are in
    # ``dtype`` too)
    checkpoint: dict | None = None
    chat_template: ChatTemplateCard | None = None
    dtype: str | None = None
    quantization: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
