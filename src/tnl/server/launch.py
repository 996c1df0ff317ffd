"""`serve`: run the HTTP server until SIGTERM / Ctrl-C.

The port opens at once and the model loads in the background (GET /health answers 503 until
it is ready). On SIGTERM or Ctrl-C uvicorn stops accepting connections, lets in-flight
requests finish for up to `graceful_shutdown_s` seconds, then the app's lifespan ends and the
engine shuts down; the process then exits 0. A second Ctrl-C forces the exit.
"""
from __future__ import annotations

import errno
import logging
import signal
import socket
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


class StartupError(RuntimeError):
    """`tnl serve` cannot start: the message says why and what to change (no traceback)."""


def listen_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything slow happens, so that a busy port is one
    clear error at once (uvicorn would report a raw [Errno 98] after the model loaded)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise StartupError(f"cannot listen on --host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} is already in use (another tnl or server?): stop it, or "
                               f"pick another port with --port N (--port 0 picks a free one)") from None
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(config: ServerConfig) -> int:
    """Serve `config.model` on config.host:config.port. Returns 0 after a clean shutdown.

    Raises StartupError (busy port, a model that is neither a directory nor a hub id, a
    checkpoint whose config.json tnl cannot run, or weights that failed to load) with a
    one-line message; the traceback is logged at debug level (`tnl -v serve`)."""
    _configure_logging(config.log_level)
    from tnl.config import ModelConfig
    from tnl.loading import RANDOM_MODEL, build_engine, resolve_model_dir

    sock = listen_socket(config.host, config.port)
    try:
        # Mistakes that a directory or hub lookup shows are found before the port opens; a hub
        # id not in the cache is downloaded here. Only the weights load behind /health's 503.
        path = config.model
        if config.model != RANDOM_MODEL:
            path = resolve_model_dir(config.model, config.source, config.cache_dir, config.revision)
            ModelConfig.from_file(path)
    except BaseException:
        sock.close()
        raise
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
        return AsyncEngine(build_engine(path, device=config.device, dtype=config.dtype,
                                        engine_config=config.engine_config(),
                                        chat_template_file=config.chat_template, threads=config.threads))

    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(None, config, load_engine=load_engine, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=sock.getsockname()[1], log_config=None, log_level=config.log_level,
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
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if app.state.tnl.load_error is not None:
        raise StartupError(f"the model failed to load: {app.state.tnl.load_error}")
    return 0
