"""`serve`: run the HTTP server until SIGTERM / Ctrl-C.

The port opens at once and the model loads in the background (GET /health answers 503 until
it is ready). On SIGTERM or Ctrl-C uvicorn stops accepting connections, lets in-flight
requests finish for up to `graceful_shutdown_s` seconds, then the app's lifespan ends and the
engine shuts down; the process then exits 0. A second Ctrl-C forces the exit.
"""
from __future__ import annotations

import logging
import signal
import sys

import uvicorn

from tnl.server.config import ServerConfig

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005


def _configure_logging(level: str) -> None:
    """Log to stderr at `level`; a caller that set up logging already (the CLI's -v) may keep a
    more verbose level."""
    root = logging.getLogger()
    wanted = logging.getLevelName(level.upper())
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=wanted)
    else:
        root.setLevel(min(root.level, wanted))


def serve(config: ServerConfig) -> int:
    """Serve `config.model` on config.host:config.port. Returns the process exit code:
    0 after a clean shutdown, 1 when the model failed to load."""
    _configure_logging(config.log_level)
    # The engine thread waits for the GPU with the GIL released; when the step is done it must
    # take the GIL back from the event loop, which is busy writing every stream's chunk. CPython
    # makes a waiting thread wait up to the switch interval (5 ms by default) for that: on an H100
    # the HTTP inter-token p50 was 14.4 ms against a 9.4 ms engine step, a 5.0 ms gap (see
    # BENCHMARKS.md). A 0.5 ms interval bounds that wait.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    from tnl.engine import AsyncEngine
    from tnl.server.app import build_app

    def load_engine():
        log.info("loading %s on %s (%s)", config.model or "the bundled demo model", config.device, config.dtype)
        return AsyncEngine.from_pretrained(config.model, device=config.device, dtype=config.dtype,
                                           engine_config=config.engine_config(),
                                           chat_template_file=config.chat_template, source=config.source)

    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(None, config, load_engine=load_engine, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, log_level=config.log_level,
        access_log=False,  # tnl.access logs each request once, with its request id and token counts
        timeout_graceful_shutdown=config.graceful_shutdown_s, lifespan="on"))
    if config.api_key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                    config.host)

    # uvicorn re-raises the signal that stopped it once it is done, which would end the process
    # with "killed by SIGTERM" instead of a clean 0 after a graceful shutdown; these handlers
    # receive that re-raised signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if app.state.tnl.load_error is not None:
        log.error("exiting: the model failed to load (%s)", app.state.tnl.load_error)
        return 1
    return 0
