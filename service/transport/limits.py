"""What one client may send or hold open: the transport limits, from the server's flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TransportLimits:
    """What one client may send or hold before the app sees its request (see the flags)."""

    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1024

    @classmethod
    def from_settings(cls, settings: Any) -> TransportLimits:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})
