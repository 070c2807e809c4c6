"""Server-sent events framing for streamed completions (OpenAI's ``data: {...}`` lines)."""

from __future__ import annotations

import json
from typing import Any

MEDIA_TYPE = "text/event-stream"
# No caching, and tell nginx-style proxies not to buffer the stream.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def event(data: Any) -> bytes:
    """One SSE event carrying ``data`` as compact JSON (UTF-8; strings are always valid)."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return b"data: " + payload.encode("utf-8") + b"\n\n"
