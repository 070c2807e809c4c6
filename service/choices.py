"""Folding engine events into choices: text, logprobs, usage, window crops and finish per choice.

A ``Job`` is one admitted generation call (an HTTP completions or chat request, or one offline
``LLM.generate``): one engine request per prompt, ``n`` choices each. ``Job.apply`` feeds what one
read of a request's stream collected (every token that arrived since the last read) to each
choice's ``TextStream`` (stop strings, UTF-8 safety) and logprob bookkeeping at once, and says per
choice what changed; the caller acts on that (metrics, aborting the engine request). Logprobs are
kept as neutral ``TokenEntry`` records that ``service.api.logprobs`` renders in either endpoint's
shape. Pure bookkeeping beside ``service.text``: no I/O, no HTTP shapes.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from service.engine.types import TokenEvents, TokenLogprob
from service.text import TextDelta, TextStream


@dataclass(frozen=True)
class PromptTokensDetails:
    """OpenAI's ``usage.prompt_tokens_details``: prompt tokens served from the prefix cache."""

    cached_tokens: int = 0


@dataclass(frozen=True)
class TokenUsage:
    """A job's token counts (the API's ``usage``)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    def to_dict(self) -> dict:
        """The API's ``usage`` object (``dataclasses.asdict``'s answer, without its deep walk:
        every streamed request ends with one)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.prompt_tokens_details.cached_tokens},
        }


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
    cached_tokens: int = 0  # prompt tokens the engine reused from its prefix cache
    parts: list[str] = field(default_factory=list)
    lp_sent: int = 0  # logprob entries already sent in stream chunks
    window_sent: tuple[bool, int] = (False, 0)  # (prompt_cropped, crops) last streamed

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
    def window_moved(self) -> bool:
        """The window slid (or the prompt was cropped) since the last streamed chunk said so."""
        return (self.prompt_cropped, self.crops) != self.window_sent

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
        self.window_sent = (self.prompt_cropped, self.crops)
        return {"prompt_cropped": self.prompt_cropped, "crops": self.crops}


@dataclass(frozen=True)
class Echo:
    """A prompt as ``echo`` returns it: its text, and its tokens as logprob entries (null
    logprobs: the engine does not score prompts; empty unless logprobs were asked for)."""

    text: str
    entries: tuple[TokenEntry, ...] = ()

    @classmethod
    def of(cls, prompt: Sequence[int], tokenizer, *, logprobs: bool) -> Echo:
        """Work proportional to the prompt: the API builds a big one in a worker thread."""
        text = tokenizer.decode(list(prompt))
        if not logprobs:
            return cls(text)
        entries, offset, widths = [], 0, {}  # widths: each token's text length, once per id
        for token_id in prompt:
            entries.append(TokenEntry(token_id, None, None, offset))
            width = widths.get(token_id)
            if width is None:
                raw = tokenizer.token_bytes(token_id)
                width = widths[token_id] = len(raw.decode("utf-8", errors="replace"))
            offset += width
        return cls(text, tuple(entries))


@dataclass(slots=True)
class Update:
    """What one read of a request's events changed for one choice: its new text (every token
    that arrived since the last read), and whether things ended."""

    choice: ChoiceState
    text: str
    request_id: str  # the engine request, and the choice's index in it
    engine_index: int
    finished: bool = False  # this read ended the choice
    request_done: bool = False  # ...and with it every choice of its engine request
    stopped_early: bool = False  # a stop string ended it: the engine has not finished it yet
    num_tokens: int = 0  # tokens this read added


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
    streams: list[AsyncIterator[TokenEvents]] = field(default_factory=list)
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
        echo: Echo | None,
        logprobs: bool,
    ) -> None:
        """Register one engine request (already admitted) and its ``n`` choices; ``echo``: the
        prompt to prepend to each choice (``Echo.of``), or None."""
        index = len(self.request_ids)
        self.request_ids.append(request_id)
        self.prompt_index[request_id] = index
        self.streams.append(stream)
        self.prompt_tokens += len(prompt)
        for j in range(self.n):
            choice = ChoiceState(
                index=index * self.n + j,
                stream=TextStream(self.tokenizer, stop, offsets=logprobs),
                prefix=echo.text if echo else "",
                want_logprobs=logprobs,
            )
            if logprobs and echo:
                choice.entries.extend(echo.entries)
            self.choices.append(choice)

    @property
    def all_done(self) -> bool:
        return self.num_done == len(self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def usage(self) -> TokenUsage:
        """Counts over every prompt (once each) and every choice. A prompt's cached tokens are
        those its choices all reused: its first choice computes the rest, its siblings copy it."""
        completion = self.completion_tokens
        n = self.n
        cached = sum(min(c.cached_tokens for c in self.choices[i : i + n])
                     for i in range(0, len(self.choices), n))
        return TokenUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def apply(self, events: TokenEvents, rows: list[int] | None = None) -> list[Update]:
        """Feed events of this job's requests (any number of steps, any of their choices) to
        their choices: one ``Update`` per choice that changed, in the order they appear.
        ``rows``: only those events, in that order (a step's rows for this job); None: all."""
        if rows is None:
            rows = range(len(events.token_ids))
        if len(rows) == 1:  # one token of one choice: a client that keeps up
            r = rows[0]
            update = self._apply_choice(events.request_ids[r], events.indices[r], events, [r])
            return [] if update is None else [update]
        rows_of: dict[tuple[str, int], list[int]] = {}
        request_ids, indices = events.request_ids, events.indices
        for row in rows:
            key = request_ids[row], indices[row]
            found = rows_of.get(key)
            if found is None:
                rows_of[key] = [row]
            else:
                found.append(row)
        updates = []
        for (request_id, index), choice_rows in rows_of.items():
            update = self._apply_choice(request_id, index, events, choice_rows)
            if update is not None:
                updates.append(update)
        return updates

    def _apply_choice(self, request_id: str, index: int, events: TokenEvents,
                      rows: list[int]) -> Update | None:
        prompt = self.prompt_index[request_id]
        choice = self.choices[prompt * self.n + index]
        if choice.done:
            return None  # ended by a stop string; the engine may run a step longer
        last = rows[-1]
        choice.crops, choice.prompt_cropped = events.crops[last], events.prompt_cropped[last]
        choice.cached_tokens = events.cached_tokens[last]
        finish = events.finishes.get(last)  # a choice's finishing event is its last
        token_ids = events.token_ids
        token_rows = rows if token_ids[last] is not None else [r for r in rows
                                                                if token_ids[r] is not None]
        text, reason, added = "", None, 0
        if token_rows:
            ids = [token_ids[r] for r in token_rows]
            delta = choice.stream.push_many(ids)
            added = delta.num_consumed
            choice.num_tokens += added
            logprobs, tops = events.logprobs, events.top_logprobs
            if (logprobs is None and not choice.want_logprobs and not choice.pending
                    and delta.num_tokens == added and not delta.num_dropped):
                # every token released at once, no logprobs (no stop string held text back):
                # what ``_take`` does, without the round trip through ``pending``
                choice.token_ids.extend(ids if added == len(ids) else ids[:added])
                text = delta.text
            else:
                for r in token_rows[:added]:
                    logprob = None if logprobs is None else _finite(logprobs[r])
                    if logprob is not None:
                        choice.cumulative_logprob += logprob
                    choice.pending.append((token_ids[r], logprob,
                                           None if tops is None else tops[r]))
                text = self._take(choice, delta)
            if delta.stopped:
                reason = "stop"
        if reason is None and finish is not None:
            text += self._take(choice, choice.stream.finish())
            reason = finish.reason.value
        choice.parts.append(text)
        if reason is None:
            return Update(choice, text, request_id, index, num_tokens=added)
        self.finish(choice, reason)
        siblings = self.choices[prompt * self.n : (prompt + 1) * self.n]
        done = all(c.done for c in siblings)
        if done:
            self.finished_requests.add(request_id)
        return Update(choice, text, request_id, index, finished=True, request_done=done,
                      stopped_early=finish is None, num_tokens=added)

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
