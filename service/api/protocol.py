"""The OpenAI-compatible wire format: pydantic models for requests and responses.

Requests are validated strictly (no string-to-number coercion, no NaN/Infinity, unknown fields
rejected) and converted into the engine's ``SamplingParams``; the engine re-validates ranges.
Extension fields beyond OpenAI's shape are documented in docs/API.md (``context_window`` on each
choice).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from service.engine.types import InvalidRequestError, SamplingParams

Number = StrictInt | StrictFloat
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False


class CompletionRequest(StrictModel):
    """``POST /v1/completions``: OpenAI's legacy completions request, plus top_k/min_p/
    repetition_penalty (vLLM's extensions)."""

    model: StrictStr | None = Field(None, description="must equal the served model's id")
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="text, texts, token ids, or lists of token ids; never empty")
    max_tokens: StrictInt = Field(16, description="tokens to generate (may run past the window)")
    temperature: Number = Field(1.0, description="0 is greedy")
    top_p: Number = Field(1.0, description="nucleus sampling mass in (0, 1]; 1 = off")
    top_k: StrictInt = Field(0, description="keep the k most likely tokens; 0 = off")
    min_p: Number = Field(0.0, description="drop tokens below min_p * the top probability")
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = Field(
        None, description="stop strings, matched across token boundaries, never emitted"
    )
    seed: StrictInt | None = Field(None, description="reproducible sampling, alone or batched")
    n: StrictInt = Field(1, description="choices per prompt")
    logprobs: StrictInt | None = Field(None, description="top-k log-probabilities per token, 0..5")
    echo: bool = Field(False, description="prepend the prompt to the text")
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    repetition_penalty: Number = 1.0
    logit_bias: dict[StrictStr, Number] | None = None
    user: StrictStr | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_params(self) -> SamplingParams:
        """The engine's view; ``logit_bias`` keys must be token ids (strings of integers)."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            bias[_token_key(key)] = float(value)
        return SamplingParams.create(
            max_tokens=self.max_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=self.top_k,
            min_p=float(self.min_p),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            logit_bias=bias,
            seed=self.seed,
            n=self.n,
            logprobs=self.logprobs,
        )


def _token_key(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise InvalidRequestError(
            "logit_bias", f"logit_bias keys must be token ids, got {key!r}"
        ) from None


class TokenizeRequest(StrictModel):
    model: StrictStr | None = None
    prompt: StrictStr


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(StrictModel):
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
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    context_window: ContextWindow | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    # which checkpoint served the request: changes when a new checkpoint goes live
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptserve"
    max_model_len: int
    # gptserve extension: the live checkpoint and its provenance (iteration, val_loss, ...)
    checkpoint: dict | None = None


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
