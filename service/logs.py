"""Logging for the server: one format for our records and uvicorn's, as text or JSON lines.

``configure_logging(level, fmt)`` puts one handler on the root logger (stderr). The server runs
uvicorn with ``log_config=None``, so uvicorn's loggers propagate to that handler instead of
installing their own format, and with its access log off: ours (``service.access``, one line per
request, see ``service.api.access``) replaces it. A record may carry structured fields as
``extra={"fields": {...}}``: the JSON format makes them keys of the line's object (the text format
prints the message, which already reads them out). The text format escapes control characters
in a record's line (``\\n``, ``\\x1b``): a request path or header cannot forge a line or send a
terminal escape (a traceback below the line stays as it is).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: what a terminal or a parser acts on
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(lambda m: _NAMED.get(m[0]) or f"\\x{ord(m[0]):02x}", text)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, one line per record: control characters in it are escaped."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return escape_controls(super().formatMessage(record))


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the process id
    (a server runs an engine-core process and, with ``--api-servers N``, several front ends),
    its fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send every record (ours, uvicorn's, Python warnings) to ``stream`` in one format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
