"""Rendering a choice's ``TokenEntry`` records in each endpoint's logprobs shape.

Completions use OpenAI's legacy parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs``
as ``{token text: logprob}``, ``text_offset``); chat uses ``content: [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}]``. Alternatives whose probability is exactly 0 (masked
tokens, logprob -inf) are left out: JSON cannot carry -Infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from service.api.chat_protocol import ChatTokenLogprob, TopLogprob
from service.api.protocol import Logprobs
from service.choices import TokenEntry
from service.engine.types import TokenLogprob


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text (bytes of a split character show as U+FFFD)."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def _finite(top: Sequence[TokenLogprob]) -> list[TokenLogprob]:
    return [t for t in top if math.isfinite(t.logprob)]


def legacy(entries: Sequence[TokenEntry], tokenizer) -> Logprobs:
    """The completions shape for ``entries``."""
    out = Logprobs()
    for entry in entries:
        out.tokens.append(token_text(tokenizer, entry.token_id))
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append(
            None
            if entry.top is None
            else {token_text(tokenizer, t.token_id): t.logprob for t in _finite(entry.top)}
        )
        out.text_offset.append(entry.offset)
    return out


def chat(entries: Sequence[TokenEntry], tokenizer) -> list[ChatTokenLogprob]:
    """The chat shape for ``entries`` (generated tokens only: each has a finite logprob)."""
    out = []
    for entry in entries:
        raw = tokenizer.token_bytes(entry.token_id)
        top = [
            TopLogprob(
                token=token_text(tokenizer, t.token_id),
                logprob=t.logprob,
                bytes=list(tokenizer.token_bytes(t.token_id)),
            )
            for t in _finite(entry.top or ())
        ]
        out.append(
            ChatTokenLogprob(
                token=raw.decode("utf-8", errors="replace"),
                # never None for a generated token; -9999 is OpenAI's "vanishingly unlikely"
                logprob=entry.logprob if entry.logprob is not None else -9999.0,
                bytes=list(raw),
                top_logprobs=top,
            )
        )
    return out
