"""Logging for the server: one format for our records and uvicorn's, as text or JSON lines.

``configure_logging(level, fmt)`` puts one handler on the root logger (stderr). The server runs
uvicorn with ``log_config=None``, so uvicorn's loggers propagate to that handler instead of
installing their own format, and with its access log off: ours (``service.access``, one line per
request, see ``service.api.access``) replaces it. A record may carry structured fields as
``extra={"fields": {...}}``: the JSON format makes them keys of the line's object (the text format
prints the message, which already reads them out).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, its fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send every record (ours, uvicorn's, Python warnings) to ``stream`` in one format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
