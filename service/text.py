"""Text lives at the edges: token ids in, UTF-8-safe text deltas out, stop strings cut exactly.

The engine speaks token ids. For each choice the API layer keeps one ``TextStream`` that turns the
ids into text incrementally (never splitting a multi-byte character, via the model package's
``IncrementalDecoder``) and finds stop strings across token boundaries. Text that might be the
start of a stop string is held back, so a stop string is never partly emitted: a stop string can
only begin inside the held-back tail, because everything released earlier was, at release time,
not a prefix of any stop string. Going the other way, ``encode_text`` is the one door from request
text to token ids: it refuses text that is not Unicode before any tokenizer sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from model.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError


@dataclass(slots=True)  # not frozen: one is made per read of every stream (frozen init is slow)
class TextDelta:
    """Text released by one ``push``/``finish``, and how many pushed tokens it completes.

    ``num_tokens`` counts tokens (oldest first) whose text is now fully released; with a stop,
    tokens that only spelled the stop string are dropped (``num_dropped``).
    """

    text: str
    num_tokens: int
    stopped: bool = False
    num_dropped: int = 0
    offsets: tuple[int, ...] = ()  # where each released token's text starts in the full text
    num_consumed: int = 0  # tokens of a ``push_many`` taken in (all, unless a stop came first)


@dataclass
class TextStream:
    """Owns one choice's detokenizer state, its unreleased text and per-token text offsets.

    Only the unreleased tail of the text is kept (text that may still turn out to start a stop
    string, or nothing when there are no stop strings): released text belongs to the caller, so
    an endless generation costs the same per token at its millionth token as at its first.
    """

    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()
    offsets: bool = True  # report where each token's text starts (logprobs need them)
    _decoder: IncrementalDecoder = field(init=False)
    _tail: str = field(init=False, default="")  # decoded, not yet released
    _released: int = field(init=False, default=0)  # chars released so far (where _tail starts)
    _token_ends: list[int] = field(init=False, default_factory=list)  # per pending token
    _token_starts: list[int] = field(init=False, default_factory=list)
    _done: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        self._decoder = IncrementalDecoder(self.tokenizer)
        # the end token ends a choice but is no part of its text (vLLM's skip_special_tokens)
        self._eos = self.tokenizer.eot_id
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    @property
    def done(self) -> bool:
        return self._done

    def push(self, token_id: int) -> TextDelta:
        """Add one generated token; returns the text now safe to emit."""
        return self.push_many((token_id,))

    def push_many(self, token_ids: Sequence[int]) -> TextDelta:
        """Add generated tokens (oldest first); returns the text now safe to emit, for all of
        them at once. With stop strings, tokens after the one that completes a stop are not
        consumed (``TextDelta.num_consumed`` says how many were)."""
        if self._done:
            raise RuntimeError("push after the stream finished")
        if self.stop:
            for consumed, token_id in enumerate(token_ids, 1):
                self._decode(token_id)
                hit = self._find_stop()
                if hit is not None:
                    return self._release(hit, stopped=True, consumed=consumed)
            end = self._released + len(self._tail)
            return self._release(end - self._held_suffix(), consumed=len(token_ids))
        if not self.offsets:  # no stop string, no per-token offsets: one decode for them all
            ids = token_ids if self._eos not in token_ids else [
                t for t in token_ids if t != self._eos]
            self._tail += self._decoder.push_many(ids)
            return self._release_all(len(token_ids))
        for token_id in token_ids:
            self._decode(token_id)
        return self._release(self._released + len(self._tail), consumed=len(token_ids))

    def _release_all(self, num_tokens: int) -> TextDelta:
        text, self._tail = self._tail, ""
        self._released += len(text)
        return TextDelta(text, num_tokens, num_consumed=num_tokens)

    def _decode(self, token_id: int) -> None:
        piece = "" if token_id == self._eos else self._decoder.push(token_id)
        start = self._released + len(self._tail)
        self._tail += piece  # the tail is what is held back: short
        self._token_starts.append(start)
        self._token_ends.append(start + len(piece))

    def finish(self) -> TextDelta:
        """The generation ended (length/eos/abort): release everything, flushing partial bytes."""
        if self._done:
            return TextDelta("", 0)
        tail = self._decoder.flush()
        if tail:
            self._tail += tail
            if self._token_ends:
                self._token_ends[-1] = self._released + len(self._tail)
        hit = self._find_stop() if self.stop else None
        end = self._released + len(self._tail)
        return self._release(end if hit is None else hit, stopped=hit is not None, final=True)

    def _find_stop(self) -> int | None:
        """Start (in the full text) of the earliest stop string in the unreleased text, if any."""
        starts = [i for i in (self._tail.find(s) for s in self.stop) if i >= 0]
        return self._released + min(starts) if starts else None

    def _held_suffix(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        window = self._tail
        for k in range(min(len(window), self._longest_stop - 1), 0, -1):
            tail = window[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _release(self, upto: int, *, stopped: bool = False, final: bool = False,
                 consumed: int = 0) -> TextDelta:
        cut = upto - self._released
        text, self._tail = self._tail[:cut], self._tail[cut:]
        self._released = upto
        if stopped or final:
            self._done = True
            kept = (
                sum(1 for s in self._token_starts if s < upto) if stopped else len(self._token_ends)
            )
            offsets = tuple(self._token_starts[:kept])
            dropped = len(self._token_ends) - kept
            self._token_starts.clear()
            self._token_ends.clear()
            return TextDelta(text, kept, stopped=stopped, num_dropped=dropped, offsets=offsets,
                             num_consumed=consumed)
        ends = self._token_ends
        done = len(ends) if not ends or ends[-1] <= upto else sum(1 for e in ends if e <= upto)
        offsets = tuple(self._token_starts[:done])
        del self._token_starts[:done]
        del ends[:done]
        return TextDelta(text, done, offsets=offsets, num_consumed=consumed)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text)``, refusing text that is not Unicode characters.

    JSON can carry a lone surrogate (``"\\ud800"``), which is not a character and has no UTF-8
    bytes: a byte-level BPE tokenizer would silently replace it, so it is refused here for every
    tokenizer, like any other text the tokenizer cannot encode.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TokenizerError(
            f"the text holds a lone surrogate U+{ord(text[err.start]):04X} at character "
            f"{err.start}, which is not a Unicode character and cannot be encoded"
        ) from None
    return tokenizer.encode(text)
