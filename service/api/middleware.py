"""ASGI middleware: API-key check and request-body size limit.

Plain ASGI (not ``BaseHTTPMiddleware``) so streamed responses and client disconnects pass through
untouched. The key is compared in constant time and never logged. With ``--api-key`` the API
needs the key; the probes and the web page (it has its own key box and calls the API with it)
stay open, and so does ``/metrics`` unless ``--metrics-auth`` (vLLM keys only ``/v1``).
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import APIError
from service.metrics import Metrics

OPEN_PATHS = frozenset({"/health", "/ready", "/", "/favicon.ico"})  # probes, the web page
METRICS_PATH = "/metrics"


class GateMiddleware:
    """Owns the per-request checks done before routing: authentication and body size."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body: int,
        metrics: Metrics,
        metrics_auth: bool = False,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.open_paths = OPEN_PATHS if metrics_auth else OPEN_PATHS | {METRICS_PATH}
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"] not in self.open_paths:
            if not self._authorized(scope):
                self.metrics.reject("unauthorized")
                err = APIError(
                    401,
                    "missing or invalid API key (send 'Authorization: Bearer KEY')",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await err.response()(scope, receive, send)
                return
        length = _header(scope, b"content-length")
        if length is not None:
            length = length.strip(" \t")  # optional whitespace around a field value (RFC 9110)
            if not (length.isascii() and length.isdigit()):
                self.metrics.reject("invalid")
                await APIError(
                    400, f"Content-Length must be a decimal number, got {length[:32]!r}",
                    code="invalid_http",
                ).response()(scope, receive, send)
                return
            if int(length) > self.max_body:
                await self._reject_too_large(scope, receive, send)
                return
        if scope["method"] in ("POST", "PUT", "PATCH") and not _is_json(scope):
            self.metrics.reject("invalid")
            err = APIError(
                415,
                "send the body as JSON with 'Content-Type: application/json'",
                code="unsupported_media_type",
            )
            await err.response()(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:
            await self._reject_too_large(scope, receive, send)
            return
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            self.metrics.reject("invalid")
            await APIError(
                400,
                f"request body is not valid UTF-8 ({err.reason} at byte {err.start})",
                code="invalid_json",
            ).response()(scope, receive, send)
            return
        await self.app(scope, replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        # compare_digest on bytes: the time taken does not depend on where they differ.
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key
        )

    async def _reject_too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.reject("invalid")
        err = APIError(
            413, f"request body is larger than {self.max_body} bytes", code="request_too_large"
        )
        await err.response()(scope, receive, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body (chunked uploads too), or None once it passes the limit."""
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # disconnected: the app sees an empty body
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the buffered body once, then waits on the real one (so the app
    still hears ``http.disconnect``)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _is_json(scope: Scope) -> bool:
    media = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None
