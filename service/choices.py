"""Folding engine events into choices: text, logprobs, usage, window crops and finish per choice.

A ``Job`` is one admitted generation call (an HTTP completions or chat request, or one offline
``LLM.generate``): one engine request per prompt, ``n`` choices each. ``Job.apply`` feeds one
engine event to its choice's ``TextStream`` (stop strings, UTF-8 safety) and logprob bookkeeping,
and says what changed; the caller acts on that (metrics, aborting the engine request). Logprobs
are kept as neutral ``TokenEntry`` records that ``service.api.logprobs`` renders in either
endpoint's shape. Pure bookkeeping beside ``service.text``: no I/O, no HTTP shapes.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field

from service.engine.types import RequestOutput, TokenLogprob
from service.text import TextDelta, TextStream


@dataclass(frozen=True)
class Window:
    """Whether the sliding window cropped a choice's context (the API's ``context_window``)."""

    prompt_cropped: bool = False  # the prompt was longer than the window: its start was dropped
    crops: int = 0  # window slides during generation (0: the model always saw everything)


@dataclass(frozen=True)
class TokenUsage:
    """A job's token counts (the API's ``usage``)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class TokenEntry:
    """One token of a choice's text with its log-probability (None for echoed prompt tokens)."""

    token_id: int
    logprob: float | None
    top: tuple[TokenLogprob, ...] | None
    offset: int  # where the token's text starts in the choice's full text


@dataclass
class ChoiceState:
    """One choice's running text, logprob entries, usage, window crops and finish."""

    index: int
    stream: TextStream
    prefix: str = ""  # echoed prompt text
    want_logprobs: bool = False
    entries: list[TokenEntry] = field(default_factory=list)
    pending: list[tuple[int, float | None, tuple[TokenLogprob, ...] | None]] = field(
        default_factory=list
    )
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # released tokens (stop strings cut)
    cumulative_logprob: float = 0.0  # over every generated token (best_of ranks by it)
    finish_reason: str | None = None
    crops: int = 0  # sliding-window crops so far (engine-reported)
    prompt_cropped: bool = False
    parts: list[str] = field(default_factory=list)
    lp_sent: int = 0  # logprob entries already sent in stream chunks
    window_sent: Window = field(default_factory=Window)  # last one streamed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.prefix + "".join(self.parts)

    @property
    def generated_text(self) -> str:
        return "".join(self.parts)

    @property
    def window(self) -> Window:
        return Window(prompt_cropped=self.prompt_cropped, crops=self.crops)

    @property
    def window_moved(self) -> bool:
        """The window slid (or the prompt was cropped) since the last streamed chunk said so."""
        return self.window != self.window_sent

    @property
    def has_unsent_logprobs(self) -> bool:
        return self.want_logprobs and len(self.entries) > self.lp_sent

    def take_entries(self) -> list[TokenEntry]:
        """Logprob entries not yet streamed (and mark them sent)."""
        entries = self.entries[self.lp_sent :]
        self.lp_sent = len(self.entries)
        return entries

    def take_window(self) -> dict | None:
        """``context_window`` for a stream chunk: on the last chunk, and whenever it moved."""
        if not (self.done or self.window_moved):
            return None
        self.window_sent = self.window
        return asdict(self.window)

    def echo_prompt(self, prompt: Sequence[int], tokenizer) -> None:
        """List the echoed prompt tokens, with null logprobs: the engine does not score prompts."""
        offset = 0
        for token_id in prompt:
            self.entries.append(TokenEntry(token_id, None, None, offset))
            offset += len(tokenizer.token_bytes(token_id).decode("utf-8", errors="replace"))


@dataclass(frozen=True)
class Update:
    """What one engine event changed: new text for a choice, and whether things ended."""

    choice: ChoiceState
    text: str
    finished: bool = False  # this event ended the choice
    request_done: bool = False  # ...and with it every choice of its engine request


@dataclass
class Job:
    """One admitted generation call: its engine requests, streams and choices."""

    id: str
    created: int
    model: str
    n: int  # choices per engine request (best_of candidates when best_of > n)
    tokenizer: object
    system_fingerprint: str | None = None  # which checkpoint served it (service.reload)
    request_ids: list[str] = field(default_factory=list)
    streams: list[AsyncIterator[RequestOutput]] = field(default_factory=list)
    choices: list[ChoiceState] = field(default_factory=list)
    prompt_tokens: int = 0
    finished_requests: set[str] = field(default_factory=set)
    prompt_index: dict[str, int] = field(default_factory=dict)  # engine request id -> prompt
    num_done: int = 0  # finished choices
    first_token_at: float | None = None  # time.perf_counter() of the first token (the server's)

    def add_prompt(
        self,
        request_id: str,
        stream,
        prompt: Sequence[int],
        *,
        stop: tuple[str, ...],
        echo: bool,
        logprobs: bool,
    ) -> None:
        """Register one engine request (already admitted) and its ``n`` choices."""
        index = len(self.request_ids)
        self.request_ids.append(request_id)
        self.prompt_index[request_id] = index
        self.streams.append(stream)
        self.prompt_tokens += len(prompt)
        prefix = self.tokenizer.decode(list(prompt)) if echo else ""
        for j in range(self.n):
            choice = ChoiceState(
                index=index * self.n + j,
                stream=TextStream(self.tokenizer, stop),
                prefix=prefix,
                want_logprobs=logprobs,
            )
            if logprobs and echo:
                choice.echo_prompt(prompt, self.tokenizer)
            self.choices.append(choice)

    @property
    def all_done(self) -> bool:
        return self.num_done == len(self.choices)

    def usage(self) -> TokenUsage:
        completion = sum(c.num_tokens for c in self.choices)
        return TokenUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def apply(self, out: RequestOutput) -> Update | None:
        """Feed one engine event to its choice; None if the choice had already ended."""
        prompt = self.prompt_index[out.request_id]
        choice = self.choices[prompt * self.n + out.index]
        if choice.done:
            return None  # ended by a stop string; the engine may run a step longer
        choice.crops, choice.prompt_cropped = out.crops, out.prompt_cropped
        text, reason = "", None
        if out.token_id is not None:
            choice.num_tokens += 1
            logprob = _finite(out.logprob)
            if logprob is not None:
                choice.cumulative_logprob += logprob
            choice.pending.append((out.token_id, logprob, out.top_logprobs))
            delta = choice.stream.push(out.token_id)
            text += self._take(choice, delta)
            if delta.stopped:
                reason = "stop"
        if reason is None and out.finish_reason is not None:
            text += self._take(choice, choice.stream.finish())
            reason = out.finish_reason.value
        choice.parts.append(text)
        if reason is None:
            return Update(choice, text)
        self.finish(choice, reason)
        siblings = self.choices[prompt * self.n : (prompt + 1) * self.n]
        done = all(c.done for c in siblings)
        if done:
            self.finished_requests.add(out.request_id)
        return Update(choice, text, finished=True, request_done=done)

    def finish(self, choice: ChoiceState, reason: str) -> None:
        choice.finish_reason = reason
        self.num_done += 1

    def _take(self, choice: ChoiceState, delta: TextDelta) -> str:
        """Move the tokens whose text ``delta`` releases from pending into the logprobs."""
        released = choice.pending[: delta.num_tokens]
        del choice.pending[: delta.num_tokens + delta.num_dropped]
        choice.token_ids.extend(token_id for token_id, _, _ in released)
        if choice.want_logprobs:
            base = len(choice.prefix)
            for (token_id, logprob, top), start in zip(released, delta.offsets, strict=True):
                choice.entries.append(TokenEntry(token_id, logprob, top, base + start))
        return delta.text


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
