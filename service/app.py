"""The app factory: ``create_app(settings, engine=None)`` builds a FastAPI app with a lifespan.

The lifespan starts the engine (loading the checkpoint first when no engine was injected) and
shuts it down; tests inject an engine directly. ``load_engine`` is the one place a checkpoint
becomes an ``Engine``, shared with ``python -m service`` and the benchmark.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from service.api.admin import router as admin_router
from service.api.errors import install_error_handlers
from service.api.middleware import GateMiddleware
from service.api.routes import router
from service.api.state import ServerState
from service.metrics import Metrics
from service.reload import server_reloader
from service.settings import Settings

log = logging.getLogger("service")


def engine_config(settings: Settings):
    """The engine's config from the server settings (engine defaults where a flag is unset)."""
    from service.engine import EngineConfig

    overrides = {
        "max_batch_size": settings.max_batch_size,
        "max_queue": settings.max_queue,
        "device": settings.device,
        "dtype": settings.dtype,
    }
    if settings.kv_memory is not None:
        overrides["kv_memory"] = settings.kv_memory
    if settings.window_shift is not None:
        overrides["window_shift"] = settings.window_shift
    return EngineConfig(**overrides)


def load_engine(settings: Settings):
    """Load ``settings.checkpoint`` and build an (unstarted) engine for it."""
    from model.checkpoint import load_checkpoint
    from service.engine import Engine

    config = engine_config(settings)
    checkpoint = load_checkpoint(settings.checkpoint)
    return Engine(checkpoint, config)


def create_app(settings: Settings, engine=None) -> FastAPI:
    """A FastAPI app serving ``engine`` (or, when None, one loaded from ``settings``)."""
    metrics = Metrics()
    state = ServerState(settings, metrics, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not state.has_engine:
            state.swap_engine(await asyncio.to_thread(load_engine, settings))
        current = state.engine
        current.add_stats_listener(metrics.observe_step)
        current.start()
        reloader = app.state.reloader = server_reloader(state, engine_config)
        reloader.start(current)  # live checkpoint reload: --watch and POST /admin/reload
        log.info(
            "serving %s as %r on %s",
            settings.checkpoint,
            settings.served_model_name,
            current.device,
        )
        try:
            yield
        finally:
            state.draining = True
            await reloader.stop()
            await asyncio.to_thread(state.engine.shutdown, settings.shutdown_timeout)

    app = FastAPI(
        title="gptserve",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions for GPT checkpoints. See docs/API.md.",
    )
    app.state.server = state
    app.include_router(router)
    app.include_router(admin_router)
    install_error_handlers(app)
    app.add_middleware(
        GateMiddleware,
        api_key=settings.api_key,
        max_body=settings.max_request_bytes,
        metrics=metrics,
    )
    if settings.cors_origins:
        # Auth is a bearer header, not cookies: credentials stay off, so a "*" origin is never
        # combined with credentials.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_credentials=False,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
