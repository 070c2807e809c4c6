"""The app factory: ``create_app(settings, engine=None)`` builds a FastAPI app with a lifespan.

The lifespan starts the engine and shuts it down. With no engine injected it loads the checkpoint
in the background, so the server listens at once: /health answers and /ready says 503 until the
engine has taken its first step (a failed load is logged and stops the server). Tests inject an
engine directly. ``load_engine`` is the one place a checkpoint
becomes an ``Engine``, shared with ``python -m service`` and the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from service.api.access import AccessLogMiddleware
from service.api.admin import router as admin_router
from service.api.errors import install_error_handlers
from service.api.fast_routes import FastRoutes
from service.api.middleware import GateMiddleware
from service.api.routes import FAST_ROUTES, router
from service.api.state import ServerState
from service.chat_template import ChatTemplates
from service.metrics import Metrics, shared_folder
from service.reload import server_reloader
from service.reload.loading import in_daemon_thread
from service.settings import Settings
from service.template_worker import TemplateWorker

log = logging.getLogger("service")


def engine_config(settings: Settings):
    """The engine's config: the server's settings carry it whole (``Settings.engine``)."""
    return settings.engine


def build_engine(settings: Settings, checkpoint):
    """An (unstarted) engine serving ``checkpoint`` with ``settings``: its core in a process of
    its own (``--engine-core process``, the default) or on a thread of this one."""
    if settings.engine_core == "process":
        from service.engine.client import CoreClient

        # several API-server processes find each core's counts in the folder they share
        return CoreClient(checkpoint, engine_config(settings), log_level=settings.log_level,
                          log_format=settings.log_format, fronts=settings.api_servers,
                          counters_dir=shared_folder() if settings.api_servers > 1 else None)
    from service.engine import Engine

    return Engine(checkpoint, engine_config(settings))


def load_engine(settings: Settings):
    """Load ``settings.checkpoint`` and build an (unstarted) engine for it; a checkpoint that is
    bad, or too big to serve with these settings, is one ``CheckpointError``."""
    from model.checkpoint import load_checkpoint
    from service.reload.budget import serving_budget

    checkpoint = load_checkpoint(settings.checkpoint, budget=serving_budget(engine_config(settings)))
    return build_engine(settings, checkpoint)


def create_app(settings: Settings, engine=None, api_servers=None, follower=None) -> FastAPI:
    """A FastAPI app serving ``engine`` (or, when None, one loaded from ``settings``).
    ``api_servers`` (``service.api_servers.ApiServers``): this is front end 0 of several, and
    starts the others once its engine core is ready; ``follower``
    (``service.api_servers.Follower``): this is one of the others, and reloads are front end
    0's."""
    metrics = Metrics(multiprocess=settings.api_servers > 1)
    state = ServerState(settings, metrics, engine)
    state.api_servers = api_servers

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reloader = app.state.reloader = server_reloader(state, engine_config, build_engine)
        app.state.reload = follower.reload if follower is not None else reloader.reload

        def start(engine) -> None:
            metrics.attach(engine)  # its core's counts, read at every scrape
            engine.start()
            state.swap_engine(engine)
            if api_servers is not None:
                api_servers.start(engine, reloader)
            if follower is not None:
                follower.start(state, reloader)
            reloader.start(engine)  # live checkpoint reload: --watch and POST /admin/reload
            # what is alive now (the app, its libraries, the tokenizer, the engine's client)
            # lives as long as the server: keep it out of the cyclic collector's generations,
            # so a full pass walks only what requests made (an engine-core front end's full
            # pass over all of it paused its event loop ~0.5 s at 256 streams); vLLM's API
            # server does the same after start-up (with a full collection first: not here, where
            # the loop may be answering already)
            gc.freeze()
            log.info(
                "serving %s as %r on %s",
                settings.checkpoint,
                settings.served_model_name,
                engine.device,
            )

        async def load_and_start() -> None:
            try:  # a daemon thread with a deadline: a stuck load never blocks the exit
                start(await in_daemon_thread(
                    functools.partial(load_engine, settings),
                    name=f"loading {settings.checkpoint}",
                    timeout=settings.load_timeout,
                ))  # fmt: skip
            except Exception as err:  # noqa: BLE001 - reported, and the server stops (exit 2)
                log.error("cannot load checkpoint %s: %s", settings.checkpoint, err)
                state.load_error = err

        loading = None
        if engine is not None:
            start(engine)
        else:  # listen at once: /health answers, /ready is 503 until the engine has stepped
            loading = asyncio.create_task(load_and_start())
        try:
            yield
        finally:
            state.draining = True
            if loading is not None:
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await reloader.stop()
            await app.state.chat_templates.close()
            if api_servers is not None:  # their requests run on the core: it stops after them
                await asyncio.to_thread(api_servers.stop, settings.shutdown_timeout)
            if state.has_engine:
                await asyncio.to_thread(state.engine.shutdown, settings.shutdown_timeout)

    app = FastAPI(
        title="gptserve",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions for GPT checkpoints. See docs/API.md.",
    )
    app.state.server = state
    app.state.chat_templates = ChatTemplates(settings.chat_template, TemplateWorker())
    app.include_router(router)
    app.include_router(admin_router)
    install_error_handlers(app)
    # innermost: a valid generation request goes from here to its handler (past FastAPI's router)
    app.add_middleware(FastRoutes, routes=FAST_ROUTES)
    app.add_middleware(
        GateMiddleware,
        api_key=settings.api_key,
        max_body=settings.max_request_bytes,
        metrics=metrics,
        metrics_auth=settings.metrics_auth,
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
    app.add_middleware(AccessLogMiddleware)  # outermost: it sees every answer, 401s included
    return app
