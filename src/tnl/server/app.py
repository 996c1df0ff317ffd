"""The FastAPI app: routes, error handling, API-key check, CORS, access log, engine lifetime.

Middleware order, outermost first:
    AccessLogMiddleware  request id, one access-log line, tnl_requests_total, and the last-resort
                         500 (logged traceback, generic message, the server stays up)
    SecurityHeadersMiddleware  CSP, nosniff, no framing, no referrer, on every response
    SiteGuardMiddleware  Host check (DNS rebinding) and cross-site non-JSON posts (403)
    BodyTimeoutMiddleware  408 when a body does not arrive within --body-timeout-s
    CORSMiddleware       only with --cors-origins (so even a 401 carries CORS headers)
    APIKeyMiddleware     only with --api-key; runs before the body is read
    BodyLimitMiddleware  413 for a body over --max-body-mb, refused before or while it is read;
                         499 for a client that leaves before its body is complete
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

import tnl
from tnl.server import routes_openai, routes_ops, routes_seed, routes_state
from tnl.server.config import ServerConfig
from tnl.server.errors import install_error_handlers
from tnl.server.metrics import ServerMetrics
from tnl.server.middleware import (
    FAVICON,
    AccessLogMiddleware,
    APIKeyMiddleware,
    BodyLimitMiddleware,
    BodyTimeoutMiddleware,
    SecurityHeadersMiddleware,
    SiteGuardMiddleware,
)
from tnl.server.openapi import allow_every_method, install_openapi
from tnl.server.serving import ServerState

log = logging.getLogger(__name__)
access_log = logging.getLogger("tnl.access")


def build_app(engine, server_config: ServerConfig, *, load_engine: Callable[[], object] | None = None,
              on_load_error: Callable[[], None] | None = None) -> FastAPI:
    """The HTTP app over an engine.

    Args:
        engine: a started tnl.engine.AsyncEngine, or None when `load_engine` will make one.
        server_config: the server's options (model name, API key, CORS, logging, ...).
        load_engine: called in a background thread at startup when `engine` is None, so the port
            opens at once and GET /health says 503 until the model is loaded.
        on_load_error: called (from that thread) when load_engine raises; `serve` stops the server.

    Returns:
        The FastAPI app. It owns the engine: the engine is shut down when the app's lifespan ends.
    """
    metrics = ServerMetrics(lambda: state.engine.stats() if state.engine is not None else None)
    state = ServerState(config=server_config, metrics=metrics, engine=engine)

    def load() -> None:
        try:
            eng = load_engine()
        except BaseException as e:
            state.load_error = f"{type(e).__name__}: {e}"
            # one line; `serve` ends with it. The traceback is for -v (a user's mistake is not a crash)
            log.error("loading the model failed: %s", state.load_error)
            log.debug("loading the model failed", exc_info=True)
            if on_load_error is not None:
                on_load_error()
            return
        if state.shutting_down:
            eng.shutdown()
            return
        state.engine = eng
        log.info("model %s ready; serving it as '%s'", server_config.model or "(demo)", state.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None and load_engine is not None:
            threading.Thread(target=load, name="tnl-load", daemon=True).start()
        try:
            yield
        finally:
            state.shutting_down = True
            if state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)
                log.info("engine shut down")

    # /docs works offline: FastAPI's own page loads Swagger UI from a CDN that users in China and
    # air-gapped networks cannot reach. fastapi-offline ships Swagger UI 5's files and does FastAPI's
    # "self-hosting JavaScript and CSS for docs" recipe (/docs and /docs/oauth2-redirect kept);
    # chosen over swagger-ui-bundle, whose last release (2023) is still Swagger UI 4 in a
    # wheel three times the size. Its files are mounted at /static/docs, ahead of the chat
    # page's /static mount, so the key check and the metrics label treat them as static files.
    app = FastAPIOffline(title="tnl", version=tnl.__version__, lifespan=lifespan, redoc_url=None,
                         static_url="/static/docs", favicon_url="/favicon.ico",
                         description="TransNormerLLM serving: the seed tutorial's POST /, an OpenAI-compatible "
                                     "API under /v1, and operations routes. Numbers are strict: an integer field "
                                     "takes 1, not 1.0 or \"1\" (JSON Schema counts 1.0 as an integer; this "
                                     "server does not).")
    app.state.tnl = state
    install_error_handlers(app)
    routers = (routes_seed.router, routes_openai.router, routes_ops.router, routes_state.router)
    for router in routers:
        app.include_router(router)
    install_openapi(app, state)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(FAVICON, media_type="image/vnd.microsoft.icon")

    # fastapi-offline sets FastAPI's docs_url to None: its page is an ordinary route at /docs
    known_paths = frozenset({route.path for router in routers for route in router.routes}
                            | {"/docs", app.swagger_ui_oauth2_redirect_url, app.openapi_url, "/favicon.ico"})
    app.mount("/static", StaticFiles(directory=routes_seed.STATIC_DIR, check_dir=False), name="static")
    allow_every_method(app, [*app.routes, *(route for router in routers for route in router.routes)])
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_body_mb * 2 ** 20)
    if server_config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=server_config.api_key)
    if server_config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server_config.cors_origins),
                           allow_methods=["*"], allow_headers=["*"], expose_headers=["x-request-id"])
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=server_config.body_timeout_s)
    app.add_middleware(SiteGuardMiddleware, bind_host=server_config.host, allowed_hosts=server_config.allowed_hosts,
                       cors_origins=server_config.cors_origins)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(AccessLogMiddleware, metrics=metrics, log_prompts=server_config.log_prompts,
                       known_paths=known_paths)
    return app
