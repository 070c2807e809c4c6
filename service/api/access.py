"""The access log: one line per HTTP request, and the request id that ties it to the client.

``AccessLogMiddleware`` is the outermost middleware. It gives each request an id (the client's
``X-Request-Id`` when it sends a sane one, e.g. from nginx's ``$request_id``, else a fresh one),
returns it as ``X-Request-Id``, and when the response has ended logs one line on
``service.access``: id, client, method, path, status and total time, plus the prompt and
completion tokens and the time to the first token when the handler reported them on
``request.state.access`` (an ``AccessRecord``). It replaces uvicorn's access log. Probes and
scrapes (/health, /ready, /metrics) are logged at debug level so they do not drown the requests
that matter.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.sse import DIRECT_SEND

log = logging.getLogger("service.access")

QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
CLIENT_GONE = 499  # nginx's status for "the client closed the connection before the answer"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass
class AccessRecord:
    """What a handler tells the access log about its request, filled in as the request runs."""

    request_id: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token: float | None = None  # seconds from arrival to the first token


class AccessLogMiddleware:
    """Owns the request id and the one access-log line of every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = AccessRecord(_request_id(scope))
        scope.setdefault("state", {})["access"] = record  # the handler's request.state.access
        # the send below every middleware: an SSE stream writes its events there (they pass
        # every wrapper unchanged; see service.api.sse.EventStreamResponse)
        scope[DIRECT_SEND] = send
        header = (b"x-request-id", record.request_id.encode())
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = status or 500  # the server's error middleware answers 500
            raise
        finally:
            _log_line(scope, record, status or CLIENT_GONE, time.perf_counter() - started)


def _log_line(scope: Scope, record: AccessRecord, status: int, seconds: float) -> None:
    level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
    if not log.isEnabledFor(level):
        return
    client = scope.get("client")
    fields = {
        "request_id": record.request_id,
        "client": client[0] if client else None,
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "ttft_s": _round(record.time_to_first_token),
        "duration_s": _round(seconds),
    }
    rest = " ".join(
        f"{k}={'-' if v is None else v}"
        for k, v in fields.items()
        if k not in ("method", "path", "status")
    )
    log.log(level, "%s %s %d %s", scope["method"], scope["path"], status, rest,
            extra={"fields": fields})  # fmt: skip


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
            break
    return os.urandom(16).hex()  # 128 random bits, 32 hex digits: a uuid4's shape, 1/4 its cost
