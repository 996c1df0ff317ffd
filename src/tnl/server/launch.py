"""`serve`: run the HTTP server until SIGTERM / Ctrl-C.

The port opens at once and the model loads in the background (GET /health answers 503 until
it is ready). On SIGTERM or Ctrl-C uvicorn stops accepting connections; requests still waiting
for a slot (and any new one) get a 503 at once, running ones may finish for up to
`graceful_shutdown_s` seconds, then streams end with a finish_reason "abort" chunk and
`data: [DONE]` and the others get a 503 (ServerState.begin_shutdown). Then the app's lifespan
ends and the engine shuts down; the process exits 0. A second Ctrl-C forces the exit.

uvicorn times out only idle kept-alive connections; `GuardedHTTP` adds a deadline for each
request's headers (a client that never sends a byte, or sends its headers a byte at a time, is
closed) and a cap on open connections. The body's deadline is app.BodyTimeoutMiddleware.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable

import uvicorn

from tnl.server.config import ServerConfig
from tnl.server.errors import error_body

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
# uvicorn cancels what still runs this long after tnl's own deadline. By then tnl has ended every
# request (a stream's last chunk needs only the engine's abort); only a client that stopped
# reading its stream is still there.
SHUTDOWN_BACKSTOP_S = 5.0
STALLED_S = 1.0      # after tnl's deadline, connections still writing are cut (their clients stopped reading)
LINGER_S = 2.0       # a refused connection is kept reading this long, so the client reads the 503
OWN_FILES = 128      # open files the server needs besides connections (model shards, pipes, ...)


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


def _raw_response(status: int, reason: str, message: str, headers: str = "") -> bytes:
    """An error response in OpenAI's shape written straight to a socket (no request was read, or
    none will be), ending the connection."""
    body = json.dumps(error_body(message, status)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{headers}\r\n").encode() + body


class _Guard:
    """Mixed into uvicorn's HTTP/1.1 protocol class (httptools when installed, else h11; both keep
    the request being answered in `self.cycle`): a deadline for a request's headers and a cap on
    open connections, which uvicorn lacks (its only read timeout is for idle kept-alive
    connections, armed after a response; `limit_concurrency` answers text/plain and still keeps
    every connection open)."""

    header_timeout_s = 10.0
    max_connections = 1000

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._got_bytes = False

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._got_bytes = False
        if self.header_timeout_s > 0:
            self._timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if self.transport.is_closing() or not self._awaiting_headers():
            return
        if self._got_bytes:   # a request had begun: say why it ends (a silent one just closes)
            log.debug("closing %s: request headers not complete after %g s", self.client, self.header_timeout_s)
            self.transport.write(_raw_response(
                408, "Request Timeout", f"the request headers did not arrive within {self.header_timeout_s:g} s "
                                        f"(--header-timeout-s)"))
        self.transport.close()

    def connection_made(self, transport) -> None:
        if len(self.server_state.connections) >= self.max_connections:
            # never joins uvicorn's connections: answered, then closed after the client has read it
            self._refused = True
            self.transport = transport
            log.warning("refused a connection from %s: %d are open (--max-connections)",
                        transport.get_extra_info("peername"), self.max_connections)
            transport.write(_raw_response(503, "Service Unavailable",
                                          f"too many open connections ({self.max_connections}, --max-connections); "
                                          f"retry later", "retry-after: 1\r\n"))
            if transport.can_write_eof():
                transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, transport.close)
            return
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return   # read and dropped: unread data would make close() reset the connection
        super().data_received(data)
        if self._timer is not None:
            if self._awaiting_headers():
                self._got_bytes = True
            else:
                self._disarm()   # the app has the request; the body's deadline is the app's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._awaiting_headers():
            self._arm()   # the next request's headers (pipelined ones have started already)

    def connection_lost(self, exc) -> None:
        self._disarm()
        if not self._refused:
            super().connection_lost(exc)


def guarded_http_protocol(config: ServerConfig) -> type[asyncio.Protocol]:
    """uvicorn's own HTTP/1.1 protocol class with `_Guard`'s header deadline and connection cap."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("GuardedHTTP", (_Guard, AutoHTTPProtocol), {
        "header_timeout_s": config.header_timeout_s, "max_connections": config.max_connections})


def _raise_open_file_limit(max_connections: int) -> None:
    """Let the process hold --max-connections sockets: raise the soft open-file limit (often 1024)
    up to the hard one when it is lower, as Go does for its servers; warn if that is not enough."""
    try:
        import resource
    except ImportError:   # Windows: no such limit
        return
    want = max_connections + OWN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    except (ValueError, OSError):
        pass
    if soft < want:
        log.warning("the open-file limit is %d, too low for --max-connections %d: connections past about %d "
                    "fail; lower --max-connections or raise the limit (ulimit -n)",
                    soft, max_connections, soft - OWN_FILES)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app at once when a signal starts the shutdown, and cutting
    the connections of clients that stopped reading once the app's deadline has passed (their
    answers' last bytes would never be sent; uvicorn would cancel their requests later, logging a
    traceback for each)."""

    def __init__(self, config: uvicorn.Config, on_shutdown, stalled_after_s: float):
        super().__init__(config)
        self.on_shutdown = on_shutdown
        self.stalled_after_s = stalled_after_s

    async def shutdown(self, sockets=None) -> None:
        self.on_shutdown()
        asyncio.get_running_loop().call_later(self.stalled_after_s, self._cut_stalled)
        await super().shutdown(sockets)

    def _cut_stalled(self) -> None:
        stalled = list(self.server_state.connections)
        if stalled:
            log.warning("cutting %d connections whose clients stopped reading their answers", len(stalled))
        for conn in stalled:
            conn.transport.abort()   # (close() would wait for the unread bytes to be sent)


def resolve_model(config: ServerConfig) -> str:
    """The model's local directory (or RANDOM_MODEL). Mistakes that a directory or hub lookup
    shows are raised here, before anything slow; a hub id not in the cache is downloaded."""
    from tnl.config import ModelConfig
    from tnl.loading import RANDOM_MODEL, resolve_model_dir

    if config.model == RANDOM_MODEL:
        return config.model
    path = resolve_model_dir(config.model, config.source, config.cache_dir, config.revision)
    ModelConfig.from_file(path)
    return path


def engine_loader(config: ServerConfig, path: str) -> Callable[[], object]:
    """build_app's `load_engine`: builds the AsyncEngine of `config` over the model at `path`
    (`serve`'s, and each replica's under Ray Serve, tnl.ray_app)."""
    def load_engine():
        from tnl.engine import AsyncEngine
        from tnl.loading import build_engine

        log.info("loading %s on %s (%s)", config.model or "the bundled demo model", config.device, config.dtype)
        return AsyncEngine(build_engine(path, device=config.device, dtype=config.dtype,
                                        engine_config=config.engine_config(),
                                        chat_template_file=config.chat_template, threads=config.threads,
                                        kernel_config=config.kernel_config, quantization=config.quantization))
    return load_engine


def serve(config: ServerConfig) -> int:
    """Serve `config.model` on config.host:config.port. Returns 0 after a clean shutdown.

    Raises StartupError (busy port, a model that is neither a directory nor a hub id, a
    checkpoint whose config.json tnl cannot run, or weights that failed to load) with a
    one-line message; the traceback is logged at debug level (`tnl -v serve`)."""
    _configure_logging(config.log_level)
    sock = listen_socket(config.host, config.port)
    try:
        # Only the weights load behind /health's 503.
        path = resolve_model(config)
    except BaseException:
        sock.close()
        raise
    # The engine thread waits for the GPU with the GIL released; when the step is done it must
    # take the GIL back from the event loop, which is busy writing every stream's chunk. CPython
    # makes a waiting thread wait up to the switch interval (5 ms by default) for that: on an H100
    # the HTTP inter-token p50 was 14.4 ms against a 9.4 ms engine step, a 5.0 ms gap (see
    # BENCHMARKS.md). A 0.5 ms interval bounds that wait.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    from tnl.server.app import build_app

    load_engine = engine_loader(config, path)
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(None, config, load_engine=load_engine, on_load_error=stop)
    _raise_open_file_limit(config.max_connections)
    server = _Server(uvicorn.Config(
        app, host=config.host, port=sock.getsockname()[1], log_config=None, log_level=config.log_level,
        access_log=False,  # tnl.access logs each request once, with its request id and token counts
        http=guarded_http_protocol(config), ws="none",   # (tnl has no WebSocket routes)
        timeout_keep_alive=config.keep_alive_s,
        timeout_graceful_shutdown=config.graceful_shutdown_s + SHUTDOWN_BACKSTOP_S, lifespan="on"),
        on_shutdown=lambda: app.state.tnl.begin_shutdown(config.graceful_shutdown_s),
        stalled_after_s=config.graceful_shutdown_s + STALLED_S)
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
