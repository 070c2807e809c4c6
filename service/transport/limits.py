"""What one client may send or hold open: the transport limits, the one place they are defined.

Each field carries its help text; the server's flags (``--max-header-bytes`` ...) are generated
from these fields (``service.settings``), and deploy/nginx/gptserve.conf repeats the timeouts and
the header buffer for the edge in front of the replicas (tests/test_deploy_lint.py checks that it
agrees). docs/API.md "Transport limits" says what a client gets past each one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


def _limit(default, help_text: str, **meta):
    return field(default=default, metadata={"help": help_text, **meta})


@dataclass(frozen=True)
class TransportLimits:
    """What one client may send or hold before the app sees its request."""

    max_header_bytes: int = _limit(
        16 * 1024, "largest request line plus header fields, e.g. 16k; larger requests get 431",
        size=True)
    max_headers: int = _limit(100, "most header fields in one request; more get 431")
    header_timeout: float = _limit(
        10.0, "seconds a client has to send a request's headers, counted from the connection (or "
        "from the request's first byte on a kept-alive connection); then 408 and close")
    body_timeout: float = _limit(
        30.0, "seconds a client has to send a request's whole body once its headers are in; then "
        "408 and close")
    keep_alive_timeout: float = _limit(
        5.0, "seconds an idle keep-alive connection is kept open between two requests")
    max_connections: int = _limit(
        1024, "most open client connections; at the cap the connection that has waited longest "
        "on its client (idle, or still sending its headers or body) is closed to admit a new "
        "one. Lowered at start to fit the open-file limit (ulimit -n)")
    max_pipelined: int = _limit(
        16, "requests one connection may have queued behind the one being answered (HTTP/1.1 "
        "pipelining); past them its input is dropped and it is closed once those are answered")

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_headers", "max_connections", "max_pipelined"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")

    @classmethod
    def knobs(cls) -> tuple[dataclasses.Field, ...]:
        """Every field, with its help text in ``metadata["help"]`` (the server's flags)."""
        return dataclasses.fields(cls)
