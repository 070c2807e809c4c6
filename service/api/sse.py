"""Server-sent events framing for streamed completions and chat (OpenAI's ``data: {...}`` lines)."""

from __future__ import annotations

import json
from typing import Any

MEDIA_TYPE = "text/event-stream"
# No caching, and tell nginx-style proxies not to buffer the stream.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


_string = json.encoder.encode_basestring  # a JSON string literal; non-ASCII kept (UTF-8)


def _json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def event(data: Any) -> bytes:
    """One SSE event carrying ``data`` as compact JSON (UTF-8; strings are always valid)."""
    return b"data: " + _json(data) + b"\n\n"


class ChunkFramer:
    """Frames a stream's chunks; the fields every chunk repeats are encoded once (the per-token
    path is the server's hottest Python code). ``chat``: choices carry ``delta.content`` (chat
    completion chunks) rather than ``text``."""

    def __init__(self, head: dict[str, Any], *, chat: bool = False) -> None:
        self._head = head
        self._prefix = b"data: " + _json(head)[:-1] + b',"choices":['
        self._text_key = b'"delta":{"content":' if chat else b'"text":'
        self._text_end = b"}" if chat else b""

    def choice(self, choice: dict[str, Any]) -> bytes:
        """A chunk carrying one choice's delta."""
        return self._prefix + _json(choice) + b"]}\n\n"

    def text(self, index: int, text: str) -> bytes:
        """The common chunk: new text of an unfinished choice without logprobs (the same bytes
        ``choice`` would give, built without a dict and a full JSON encode)."""
        return b"".join(
            (
                self._prefix,
                b'{"index":%d,' % index,
                self._text_key,
                _string(text).encode(),
                self._text_end,
                b',"logprobs":null,"finish_reason":null}]}\n\n',
            )
        )

    def usage(self, usage: dict[str, Any]) -> bytes:
        """The final usage chunk: ``choices`` is empty."""
        return event({**self._head, "choices": [], "usage": usage})
