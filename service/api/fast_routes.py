"""The short path of the generation routes: a body that validates goes from its bytes to its handler.

FastAPI reaches a handler through its router (matching every route in turn), its dependency
solver (the body parsed with ``json``, then the dict validated by pydantic through a
``TypeAdapter``) and its exception and exit-stack middleware: more of the front end's CPU per
request than the handler itself. ``FastRoutes`` sits just below the gate
(``service.api.middleware``, which has checked the key, the size and the content type and
buffered the body). For ``POST`` on a route of its table it validates the raw bytes with
pydantic-core's JSON parser (``model_validate_json``, one pass) and calls the route's handler;
what the handler raises is answered by the app's exception handlers, as FastAPI's exception
middleware would. A body that does not validate takes FastAPI's path unchanged (its bytes
replayed), so every refusal of a bad body (status, message, ``param``) is the one it always was;
the routes stay declared on FastAPI's router, which is what ``/openapi.json`` describes.

The two parses agree on every body both accept: JSON mode and Python mode run the same strict
schema, and what only ``json`` takes (lone surrogates, a byte-order mark, ``NaN``) fails here
and goes FastAPI's way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.middleware import replay


@dataclass(frozen=True)
class FastRoute:
    """A route the short path serves: its request model and its handler."""

    model: type[BaseModel]
    handler: Callable[[BaseModel, Request], Awaitable[Response]]


class FastRoutes:
    """Owns the short path: which requests take it, and the answers to what their handlers
    raise (the app's exception handlers, looked up as Starlette's ``ExceptionMiddleware`` does:
    by status for an ``HTTPException``, then by the exception's classes in MRO order; ``500``
    and ``Exception`` are left to the server-error middleware above, as there)."""

    def __init__(self, app: ASGIApp, *, routes: Mapping[str, FastRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        message = await receive()  # the gate's buffered body, whole, in one message
        body = message.get("body", b"")
        try:
            request = route.model.model_validate_json(body)
        except ValidationError:
            await self.app(scope, replay(body, receive), send)  # FastAPI says what is wrong
            return
        http = Request(scope, receive)  # the body is read: receive now waits for a disconnect
        try:
            response = await route.handler(request, http)
        except Exception as err:
            handler = _handler(scope["app"].exception_handlers, err)
            if handler is None:
                raise  # the server-error middleware answers 500 and logs it
            response = await handler(http, err)
            err.__traceback__ = None  # as Starlette does: a reused exception keeps no frames
        # what goes wrong once the response has started cannot be answered any more: it reaches
        # the server-error middleware and the log, as on FastAPI's path
        await response(scope, receive, send)


def _handler(handlers: Mapping, err: Exception):
    """The exception handler for ``err`` among the app's (None: the server-error middleware's,
    or none)."""
    if isinstance(err, HTTPException) and err.status_code != 500 and err.status_code in handlers:
        return handlers[err.status_code]
    for cls in type(err).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
