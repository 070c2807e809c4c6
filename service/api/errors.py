"""One error envelope for everything: ``{"error": {"message", "type", "param", "code"}}``.

Handlers turn every failure (our ``APIError``, pydantic validation, FastAPI's request validation,
Starlette's HTTP errors, the engine's typed errors, anything unexpected) into that envelope, so a
client never sees FastAPI's default 422 shape. They are also where refused requests are counted
(``gptserve_request_rejected_total{reason}``): schema errors, bad values, unknown models, a full
queue, a server not ready. Operator routes (``/admin/``) have their own reload metric.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine.types import EngineStoppedError, InvalidRequestError, QueueFullError

log = logging.getLogger("service.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    431: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client with ``status`` and the envelope's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status, headers=self.headers)


def queue_full() -> APIError:
    return APIError(
        503,
        "the server is at capacity; retry shortly",
        code="queue_full",
        headers={"Retry-After": "1"},
    )


def not_ready(message: str = "the server is not ready (loading or shutting down)") -> APIError:
    return APIError(503, message, code="not_ready", headers={"Retry-After": "5"})


def from_validation_error(err: ValidationError | RequestValidationError) -> APIError:
    """400 naming the first offending parameter (pydantic's location, dotted)."""
    errors = err.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(
            400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json"
        )
    loc = _field_path(first)
    if not loc:  # the body as a whole: missing, or not a JSON object
        what = "is required" if first.get("type") == "missing" else "must be a JSON object"
        return APIError(400, f"the request body {what}", code="invalid_json")
    param = loc[0]
    where = ".".join(loc)
    if any(e.get("type") == "finite_number" and _field_path(e) == loc for e in errors):
        # a number field given NaN or Infinity: one message, not each member of Number's union
        return APIError(400, f"{where} must be a finite number", param=param, code="invalid_value")
    # A union (e.g. prompt: str | list[...]) reports one error per member: say them all.
    messages = list(
        dict.fromkeys(e.get("msg", "") for e in errors if _field_path(e)[:1] == loc[:1])
    )
    return APIError(400, f"{where}: {'; or '.join(messages)}", param=param, code="invalid_value")


def _field_path(error: dict) -> list[str]:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    return [p for p in loc if not _looks_like_type(p)]


def _looks_like_type(part: str) -> bool:
    return (
        part in {"str", "int", "float", "bool"}
        or part.startswith(("list[", "dict["))
        or ("[" in part and part.endswith("]"))
        or part.startswith("function-")
    )


def reject_reason(err: APIError) -> str | None:
    """The ``gptserve_request_rejected_total`` reason for answering ``err``, if it is one."""
    if err.status == 401:
        return "unauthorized"
    if err.status == 503:
        return "queue_full" if err.code == "queue_full" else "not_ready"
    if err.status in (400, 404, 413, 415):
        return "invalid"
    return None


def _refuse(request: Request, err: APIError) -> JSONResponse:
    """Answer ``err``, counting the refusal."""
    reason = reject_reason(err)
    if reason is not None and not request.url.path.startswith("/admin/"):
        request.app.state.server.metrics.reject(reason)
    return err.response()


def install_error_handlers(app: FastAPI) -> None:
    """Register the envelope handlers on ``app``."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return _refuse(request, err)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, err: RequestValidationError) -> JSONResponse:
        return _refuse(request, from_validation_error(err))

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, err: ValidationError) -> JSONResponse:
        return _refuse(request, from_validation_error(err))

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, err: InvalidRequestError) -> JSONResponse:
        return _refuse(request, APIError(400, err.message, param=err.param, code="invalid_value"))

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, __: QueueFullError) -> JSONResponse:
        return _refuse(request, queue_full())

    @app.exception_handler(EngineStoppedError)
    async def _stopped(request: Request, err: EngineStoppedError) -> JSONResponse:
        return _refuse(request, not_ready(str(err) or "the server is shutting down"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return APIError(
            err.status_code, str(err.detail), headers=dict(err.headers or {})
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", err)
        return APIError(500, "internal server error", code="internal_error").response()
