"""HTTP routes: thin handlers that delegate to the serving logic and the server state."""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from model.tokenizer import TokenizerError
from service.api.chat import ChatServing
from service.api.chat_protocol import ChatCompletionRequest, ChatCompletionResponse
from service.api.completions import CompletionServing
from service.api.errors import APIError, not_ready
from service.api.fast_routes import FastRoute
from service.api.protocol import (
    ChatTemplateCard,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from service.api.serving import offload
from service.api.state import ServerState, server_state
from service.chat_template import ChatTemplates
from service.metrics import CONTENT_TYPE
from service.text import encode_text

router = APIRouter()
StateDep = Annotated[ServerState, Depends(server_state)]
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


def chat_templates(request: Request) -> ChatTemplates:
    """The app's ``ChatTemplates`` (FastAPI dependency)."""
    return request.app.state.chat_templates


TemplatesDep = Annotated[ChatTemplates, Depends(chat_templates)]


def _engine_or_503(state: ServerState):
    if not state.has_engine:
        raise not_ready()
    return state.engine


def _check_model(state: ServerState, model: str | None) -> None:
    served = state.settings.served_model_name
    if model is not None and model != served:
        raise APIError(
            404,
            f"model {model!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=_ERRORS,
    summary="Create a completion (OpenAI-compatible; SSE when stream is true)",
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await CompletionServing(request.app.state.server).create(body, request)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=_ERRORS,
    summary="Create a chat completion (OpenAI-compatible; SSE when stream is true)",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    app = request.app.state
    return await ChatServing(app.server, app.chat_templates).create(body, request)


# the routes a valid body reaches past FastAPI's router and dependencies (the handlers above,
# called by service.api.fast_routes with the body it validated)
FAST_ROUTES = {
    "/v1/completions": FastRoute(CompletionRequest, create_completion),
    "/v1/chat/completions": FastRoute(ChatCompletionRequest, create_chat_completion),
}


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request, state: StateDep, templates: TemplatesDep) -> ModelList:
    engine = _engine_or_503(state)
    reloader = getattr(request.app.state, "reloader", None)
    live = reloader.info if reloader is not None else None
    quant = engine.config.quantization
    return ModelList(
        data=[
            ModelCard(
                id=state.settings.served_model_name,
                created=state.started,
                max_model_len=engine.model_config.block_size,
                checkpoint=live.to_dict() if live is not None else None,
                chat_template=ChatTemplateCard(**await templates.card(engine)),
                dtype=str(engine.dtype).removeprefix("torch."),
                quantization=None if quant == "none" else quant,
            )
        ]
    )


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, state: StateDep) -> TokenizeResponse:
    engine = _engine_or_503(state)
    _check_model(state, body.model)
    try:
        ids = await offload(len(body.prompt), encode_text, engine.tokenizer, body.prompt)
    except TokenizerError as err:
        raise APIError(400, str(err), param="prompt", code="invalid_value") from None
    return TokenizeResponse(
        tokens=ids, count=len(ids), max_model_len=engine.model_config.block_size
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, state: StateDep) -> DetokenizeResponse:
    engine = _engine_or_503(state)
    _check_model(state, body.model)
    engine.check_token_ids(body.tokens, "tokens")
    text = await offload(len(body.tokens), engine.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)


@router.get(
    "/health",
    summary="Liveness: the process is up (503 once its engine thread has died: restart it)",
    responses={503: {"model": ErrorResponse}},
)
async def health(state: StateDep) -> JSONResponse:
    if state.has_engine and state.engine.error is not None:
        return APIError(503, f"the engine failed: {state.engine.error!r}",
                        code="engine_failed").response()
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    summary="Readiness: 200 once the engine has taken a step, 503 while loading or draining",
    responses={503: {"model": ErrorResponse}},
)
async def ready(state: StateDep) -> JSONResponse:
    if not state.ready:
        return not_ready(f"not ready: {state.not_ready_reason()}").response()
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    if state.has_engine:
        state.metrics.set_load(state.engine.stats())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    html = resources.files("service.web").joinpath("index.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    # An SVG icon (every current browser takes one, whatever the path says).
    svg = resources.files("service.web").joinpath("favicon.svg").read_bytes()
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
