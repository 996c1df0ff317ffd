"""The HTTP server's ASGI middlewares (the order they run in is in tnl.server.app), and the
checks they share: API key, body size and read deadline, Host and cross-site checks, security
headers, the access log with its metrics label."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
import uuid
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tnl.server import routes_seed
from tnl.server.errors import error_body, error_response
from tnl.server.metrics import ServerMetrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("tnl.access")

# Reachable without the API key: liveness for load balancers, and the chat page with its files
# and the API docs (pages only; everything they call needs the key).
OPEN_PATHS = {"/health", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico"}
OPEN_PREFIXES = ("/static/",)  # the chat page's files, and the docs' under /static/docs/

# 32x32 and 16x16 PNGs in one ICO container, drawn for tnl with Python's zlib and struct.
FAVICON = os.path.join(routes_seed.STATIC_DIR, "favicon.ico")


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode()

    @staticmethod
    def is_open(scope: Scope) -> bool:
        path, method = scope["path"], scope["method"]
        if method == "OPTIONS":  # CORS preflights carry no credentials
            return True
        if method in ("GET", "HEAD"):
            return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_open(scope):
            return await self.app(scope, receive, send)
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return await self.app(scope, receive, send)
        message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not header
                   else "invalid API key")
        response = error_response(message, 401, None, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyNotRead(HTTPException):
    """Raised from a route's receive() when its body is given up part-way. An HTTPException, so
    that FastAPI's body parsing passes it on and the error handlers answer it in JSON."""


class BodyLimitMiddleware:
    """Request bodies read within bounds, on every route.

    A body over `max_bytes` gets a 413 and the connection is closed: at once when its
    Content-Length says so, before a byte of it is read; else (a chunked body) as soon as the bytes
    received pass the limit, while the rest is still on its way. So no huge body is held in memory
    or parsed. A client that leaves before its body is complete is a 499, not starlette's
    ClientDisconnect (a 500 and a traceback) nor FastAPI's "error parsing the body" (a 400).
    """

    # A state file is the one body that is large by nature (65 MB for a 7B): its route checks the
    # exact size a state of the served model can have before parsing (routes_state.py).
    STATE_IMPORT_PATH, STATE_IMPORT_MAX_BYTES = "/v1/state/import", 1 << 30

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self, size: str, limit: int) -> str:
        return (f"the request body is {size}, more than this server's limit of {limit / 2 ** 20:g} MiB "
                f"(--max-body-mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = max(self.max_bytes, self.STATE_IMPORT_MAX_BYTES) if scope["path"] == self.STATE_IMPORT_PATH \
            else self.max_bytes
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > limit:
            response = error_response(self.too_large(f"{int(length)} bytes", limit), 413, None,
                                      {"Connection": "close"})
            return await response(scope, receive, send)
        received = 0
        complete = False

        async def bounded_receive() -> Message:
            nonlocal received, complete
            message = await receive()
            if complete:   # later messages: the disconnect that streams and Generation watch for
                return message
            if message["type"] == "http.disconnect":
                raise BodyNotRead(499, "the client disconnected before its request body was complete")
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyNotRead(413, self.too_large(f"over {received} bytes", limit), {"Connection": "close"})
            complete = not message.get("more_body", False)
            return message

        await self.app(scope, bounded_receive, send)


def host_name(value: str) -> str:
    """A Host header's (or --allowed-hosts entry's) name: 'Example.COM:80' -> 'example.com',
    '[::1]:6006' -> '::1', 'localhost.' -> 'localhost'."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_loopback(name: str) -> bool:
    """localhost, *.localhost (browsers resolve them to loopback themselves, RFC 6761) or a
    loopback address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def rebindable(name: str) -> bool:
    """Whether a web page could be served under `name` and then have it resolve to this machine
    (DNS rebinding): any name with a dot that is not a loopback one. A name without a dot (a
    host's own name, 'x') is never in public DNS, so no page on the web can use it; an address is
    never looked up."""
    if is_loopback(name):
        return False
    try:
        ipaddress.ip_address(name)
        return False   # an address the client connected to by number: nothing was resolved
    except ValueError:
        return "." in name


JSON_TYPE = re.compile(r"^application/([\w.+-]+\+)?json$")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class SiteGuardMiddleware:
    """What stops other web sites from using a tnl that a browser can reach.

    DNS rebinding: a page on evil.example whose name then resolves to 127.0.0.1 is same-origin
    with this server as far as the browser knows, but its requests say `Host: evil.example`. On a
    loopback --host only loopback names are served (plus --allowed-hosts); on another --host any
    name, unless --allowed-hosts lists them.

    Cross-site posts: a page may POST a text/plain, form or untyped body to any origin without
    the browser asking first (no CORS preflight), and POST / reads JSON whatever the type. Such a
    request from another origin (not this server's own, not in --cors-origins) gets a 403; JSON
    ones are preflighted, and CORS refuses them.
    """

    def __init__(self, app: ASGIApp, bind_host: str, allowed_hosts: tuple[str, ...], cors_origins: tuple[str, ...]):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed = frozenset(host_name(h) for h in allowed_hosts)
        self.loopback_only = is_loopback(host_name(bind_host))
        self.check_hosts = not self.any_host and (self.loopback_only or bool(self.allowed))
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins)

    def host_refusal(self, host: str) -> str | None:
        name = host_name(host)
        if not self.check_hosts or not host or name in self.allowed or is_loopback(name):
            return None
        if self.loopback_only and not self.allowed and not rebindable(name):
            return None
        where = ("this server listens on loopback, so it answers only to loopback names (localhost, 127.0.0.1, "
                 "[::1])"
                 if self.loopback_only else "this server answers only to the names in --allowed-hosts")
        return (f"the Host '{name}' is not served: {where} (a page under another name could be a DNS-rebinding "
                f"attack); to serve it, start tnl with --allowed-hosts {name} (or '*' for any)")

    def origin_refusal(self, scope: Scope, headers: Headers) -> str | None:
        origin = headers.get("origin")
        if origin is None or scope["method"] not in UNSAFE_METHODS or self.any_origin:
            return None
        content_type = headers.get("content-type", "")
        if JSON_TYPE.match(content_type.partition(";")[0].strip().lower()):
            return None
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins or self.own_origin(origin, headers.get("host", "").lower(), scope):
            return None
        return (f"refused a cross-origin {scope['method']} from {origin} with Content-Type "
                f"'{content_type or 'none'}': a page on another site can send that without asking this server. "
                f"Send the body as 'Content-Type: application/json', or allow the origin with "
                f"--cors-origins {origin}")

    @staticmethod
    def own_origin(origin: str, host: str, scope: Scope) -> bool:
        """A page of this server: its origin names the Host asked for, or a loopback name with this
        server's port (the chat page at localhost:6006 posting to 127.0.0.1:6006)."""
        if origin == "null":
            return False
        try:
            url = urlsplit(origin)
            port = url.port or {"http": 80, "https": 443}.get(url.scheme)
        except ValueError:
            return False
        server = scope.get("server")
        return url.netloc == host or (is_loopback(host_name(url.hostname or "")) and server is not None
                                      and port == server[1])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self.host_refusal(headers.get("host", ""))
        if refusal is not None:
            return await error_response(refusal, 400)(scope, receive, send)
        refusal = self.origin_refusal(scope, headers)
        if refusal is not None:
            return await error_response(refusal, 403)(scope, receive, send)
        await self.app(scope, receive, send)


# Pages run only scripts and styles from this server and talk only to it; nothing may frame them.
# The chat page (index.html, app.js, style.css) has no inline script or style. Swagger UI (/docs)
# starts from one inline script, allowed by its hash (it names the schema's URL, which depends on
# the root path, so it is hashed as served). Every other response is JSON, text or a file.
CSP = ("default-src 'self'; script-src 'self'{hashes}; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_CSP = CSP.format(hashes="")
DOCS_PAGES = {"/docs", "/docs/oauth2-redirect"}
INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]


def docs_csp(html: bytes) -> str:
    """PAGE_CSP plus the hash of each inline script in `html`."""
    return CSP.format(hashes="".join(f" 'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'"
                                     for s in INLINE_SCRIPT.findall(html)))


class SecurityHeadersMiddleware:
    """Content-Security-Policy, nosniff, no framing (clickjacking) and no Referer on every
    response; /docs's CSP allows its own inline script by hash, so its body is read first."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: list[Message] = []
        docs = scope["path"] in DOCS_PAGES

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
                if not docs:
                    message["headers"].append((b"content-security-policy", PAGE_CSP.encode()))
                    return await send(message)
            if not docs:
                return await send(message)
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                html = b"".join(m.get("body", b"") for m in held[1:])
                held[0]["headers"].append((b"content-security-policy", docs_csp(html).encode()))
                for m in held:
                    await send(m)

        await self.app(scope, receive, send_with_headers)


class BodyTimeoutMiddleware:
    """A 408 when a request's body has not arrived in full `timeout_s` seconds after its headers
    (a client trickling its body would hold the request open for ever). The header deadline is
    launch's, in the HTTP protocol."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.timeout_s <= 0:
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = timed_out = started = False

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out
            if body_done:
                return await receive()
            if timed_out:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                timed_out = True
                log.debug("request %s: body not complete after %g s", scope["state"].get("request_id"),
                          self.timeout_s)
                if not started:
                    await error_response(f"the request body did not arrive within {self.timeout_s:g} s of its "
                                         f"headers (--body-timeout-s)", 408, None,
                                         {"Connection": "close"})(scope, receive, send)
                return {"type": "http.disconnect"}   # what the app sees: the client is gone
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if timed_out:
                return   # the 408 went out; the app's answer to the "disconnect" is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except ClientDisconnect:
            if not timed_out:
                raise


def route_label(scope: Scope, known_paths: frozenset[str]) -> str:
    """A bounded label for metrics: the route's path, never a raw URL. Requests that ended
    before routing (a 401 from the API-key check) are labelled by their path when it is one of
    ours (no route of this app has path parameters)."""
    path = getattr(scope.get("route"), "path", None)
    if path is not None:
        return path
    if scope["path"] in known_paths:
        return scope["path"]
    return "/static" if scope["path"].startswith("/static/") else "unmatched"


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics, log_prompts: bool, known_paths: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["start_time"] = time.monotonic()
        status = [None]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s %s %s failed", rid, scope["method"], scope["path"])
            if status[0] is None:
                status[0] = 500
                body = error_body(f"internal server error (request id {rid}); the details are in the server log",
                                  500)
                await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
        finally:
            self._record(scope, state, rid, status[0])

    def _record(self, scope: Scope, state: dict, rid: str, status: int | None) -> None:
        route = route_label(scope, self.known_paths)
        code = str(status or 499)  # no response started: the client left first
        self.metrics.requests.labels(route, code).inc()
        ms = (time.monotonic() - state["start_time"]) * 1000
        client = scope.get("client")
        line = (f"{rid} {client[0] if client else '-'} {scope['method']} {scope['path']} {code} "
                f"in={state.get('tokens_in', 0)} cached={state.get('tokens_cached', 0)} out={state.get('tokens_out', 0)} "
                f"{ms:.1f}ms")
        if state.get("aborted"):
            line += " aborted"  # the client left (or the shutdown grace ran out) before the end
        if self.log_prompts and "log_prompt" in state:
            line += f" prompt={state['log_prompt']!r} response={state.get('log_response', '')!r}"
        access_log.info(line)
