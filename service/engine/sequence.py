"""One choice of one request as it moves through the engine: tokens, window, slot, timings.

Plain Python (no torch), so the scheduler that drives it is unit-tested in milliseconds.

The *window* is the part of the token list the model sees: ``tokens[window_start:]``, at most
``block_size`` long, encoded at positions ``0..len-1`` (the model's positions are absolute and
learned, so a cropped window must be re-encoded from scratch). ``num_computed`` of its tokens
have keys/values in the sequence's KV slot; each step computes some of the rest (vLLM v1's
"computed tokens catch up to tokens": a whole prompt chunk, or the one token sampled last step).
"""

from __future__ import annotations

import time
from enum import Enum

from service.engine.types import FinishReason, Request


class SequenceStatus(Enum):
    WAITING = "waiting"  # no slot yet
    RUNNING = "running"  # holds a slot: prefilling, re-encoding or decoding
    FINISHED = "finished"


class Sequence:
    """Per-choice state: the token list, the encoded window, the KV slot, counters and times.

    ``seed`` is the seed of this choice's draws (``model.sampling.choice_seed`` of the request's
    seed and the choice index, or a random one); the t-th token it samples uses draw counter t
    (``num_generated``). Slotted: the step reads and writes these attributes per row.
    """

    __slots__ = (
        "seq_id", "request", "request_id", "group", "index", "params", "seed", "block_size",
        "window_shift", "tokens", "num_prompt_tokens", "status", "slot", "num_computed",
        "num_cached_tokens", "crops", "window_start", "prompt_cropped", "finish_reason", "matcher",
        "admitted_at", "token_times", "finished_at",
    )

    def __init__(
        self, seq_id: int, request: Request, index: int, block_size: int, window_shift: int,
        seed: int,
    ) -> None:
        self.seq_id = seq_id
        self.request = request
        self.request_id = request.request_id
        # the client request this sequence belongs to (fair admission is between groups)
        self.group = request.group or request.request_id
        self.index = index
        self.params = request.params
        self.seed = seed
        self.block_size = block_size
        self.window_shift = window_shift
        self.tokens: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.tokens)
        self.status = SequenceStatus.WAITING
        self.slot: int | None = None
        self.num_computed = 0
        self.num_cached_tokens = 0  # window tokens reused from another slot at admission
        self.crops = 0
        self.window_start = 0
        overflow = self.num_prompt_tokens - block_size
        if overflow > 0:  # crop the prompt from the left, window_shift tokens at a time
            steps = -(-overflow // window_shift)
            self.window_start = steps * window_shift
            self.crops = 1
        self.prompt_cropped = overflow > 0
        self.finish_reason: FinishReason | None = None
        # structured outputs: this choice's own grammar matcher (llguidance), None: unconstrained
        self.matcher = None
        # timings (time.monotonic seconds)
        self.admitted_at: float | None = None
        self.token_times: list[float] = []
        self.finished_at: float | None = None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt_tokens

    @property
    def window_len(self) -> int:
        return len(self.tokens) - self.window_start

    @property
    def num_to_compute(self) -> int:
        return self.window_len - self.num_computed

    def window(self, start: int, end: int) -> list[int]:
        """Window tokens ``start..end-1`` (positions in the window)."""
        return self.tokens[self.window_start + start : self.window_start + end]

    def next_chunk(self, chunk: int) -> tuple[int, int]:
        """The next window positions to compute ``(start, end)``: at most ``chunk`` tokens, with
        boundaries that depend only on this sequence (part of batch invariance)."""
        return self.num_computed, min(self.num_computed + chunk, self.window_len)

    def admit(self, slot: int, now: float | None = None, reused: int = 0) -> None:
        """Take ``slot``, whose positions ``0..reused-1`` already hold this window's prefix."""
        self.slot = slot
        self.num_computed = reused
        self.num_cached_tokens = reused
        self.status = SequenceStatus.RUNNING
        self.admitted_at = time.monotonic() if now is None else now

    def append_token(self, token: int, now: float | None = None) -> None:
        """Record a sampled token (computed next step, as the window's last position)."""
        self.tokens.append(token)
        self.token_times.append(time.monotonic() if now is None else now)

    def crop_if_full(self) -> bool:
        """If the window outgrew the model's block, drop ``window_shift`` tokens from the left;
        the new window is re-encoded from scratch (positions are absolute, so cached keys cannot
        be reused). Returns True on a crop."""
        if self.window_len <= self.block_size:
            return False
        self.window_start += self.window_shift
        self.num_computed = 0
        self.crops += 1
        return True

    def check_stop(self, eos_token_id: int | None) -> FinishReason | None:
        """Why this sequence must stop after its last token, or None (stop ids beat length)."""
        last = self.tokens[-1]
        if last in self.params.stop_token_ids:
            return FinishReason.STOP
        if eos_token_id is not None and last == eos_token_id and not self.params.ignore_eos:
            return FinishReason.STOP
        if self.num_generated >= self.params.max_tokens:
            return FinishReason.LENGTH
        return None

    def advance_grammar(self, token: int, eos_token_id: int | None) -> FinishReason | None:
        """Feed the sampled token to this choice's grammar; why it must finish now: ``stop`` when
        the grammar is complete (nothing may follow), ``error`` when the token broke it (the mask
        allowed none: the constraint cannot go on with this vocabulary); else None."""
        matcher = self.matcher
        if token == eos_token_id and not self.params.ignore_eos:
            return None  # the end token finishes the choice anyway (the mask allowed it)
        accepting = matcher.is_accepting()
        if not matcher.consume_token(token):
            return FinishReason.STOP if accepting else FinishReason.ERROR
        return FinishReason.STOP if matcher.is_stopped() else None

    def finish(self, reason: FinishReason, now: float | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finished_at = time.monotonic() if now is None else now
        self.slot = None
