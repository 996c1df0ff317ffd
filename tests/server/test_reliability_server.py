"""The server under stress and attack, over real HTTP: shutdown past the grace period, DNS
rebinding and cross-site posts, idle and slow (slowloris) connections, the connection cap.

Real `python -m tnl.server` subprocesses on loopback ports over a tiny checkpoint, real clients
(http.client, requests, raw sockets, Chromium). Servers: `server` (default security settings,
short read timeouts), `open_server` (--allowed-hosts, --cors-origins, a small --max-connections),
and one for the shutdown test.
"""
from __future__ import annotations

import datetime
import http.client
import json
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import requests

from helpers_server import ServerProcess, make_tiny_model, wait_for

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
LONG = {"prompt": "hello", "max_tokens": 100000, "ignore_eos": True, "temperature": 0}  # runs until stopped

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
TIMEOUT_FLAGS = ("--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S))
MAX_CONNECTIONS = 20
OPEN_FLAGS = ("--allowed-hosts", "tnl.example,Other.Example", "--cors-origins", "http://app.example",
              "--max-connections", str(MAX_CONNECTIONS))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-reliability-model"))


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerProcess(model_dir, "--max-num-seqs", "4", *TIMEOUT_FLAGS) as srv:
        yield srv
        log = srv.log()
    assert srv.proc.returncode == 0, log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def open_server(model_dir):
    with ServerProcess(model_dir, "--max-num-seqs", "4", *OPEN_FLAGS) as srv:
        yield srv
    assert srv.proc.returncode == 0, srv.log()


def _port(srv: ServerProcess) -> int:
    return srv.port


@dataclass
class Reply:
    """What one client got: status and headers (when a response started), the body as far as it
    came, when the status line and the end arrived, and how the connection ended if not cleanly."""
    status: int | None = None
    content_type: str = ""
    body: bytes = b""
    t_status: float = 0.0
    t_end: float = 0.0
    error: str | None = None

    def json(self) -> dict:
        return json.loads(self.body)

    def events(self) -> list[str]:
        return [e for e in self.body.decode().split("\n\n") if e]


def _post(port: int, path: str, body: dict, reply: Reply) -> None:
    """POST `body` on a fresh connection and read the whole answer into `reply`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        reply.t_status = time.monotonic()
        reply.status, reply.content_type = resp.status, resp.getheader("content-type", "")
        try:
            reply.body = resp.read()
        except http.client.IncompleteRead as e:
            reply.body, reply.error = e.partial, f"cut mid-body: {e!r}"
    except (OSError, http.client.HTTPException) as e:
        reply.error = repr(e)
    finally:
        reply.t_end = time.monotonic()
        conn.close()


# ---- 1. shutdown past the grace period ---------------------------------------------------------

GRACE_S = 3.0
STREAMS = 50
IN_FLIGHT = 2      # non-streaming requests running at the deadline
STALLED = 1        # a stream whose client stops reading (its answer can never be sent whole)
QUEUED = 15        # waiting for a slot at the signal: streams, completions, the tutorial's POST /


def _log_time(log: str, text: str) -> float:
    """When the first log line containing `text` was written (seconds since the epoch)."""
    line = next(line for line in log.splitlines() if text in line)
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _stalled_stream(port: int, body: dict) -> socket.socket:
    """A streaming request whose client never reads: a tiny receive buffer fills at once, then
    the server's writes wait."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    s.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return s


def test_shutdown_past_the_grace_period_is_clean(model_dir):
    srv = ServerProcess(model_dir, "--max-num-seqs", str(STREAMS + IN_FLIGHT + STALLED),
                        "--graceful-shutdown-s", str(GRACE_S))
    srv.start()
    # its first chunk, the echoed prompt with its logprobs, is megabytes: more than the socket buffers hold
    stalled = _stalled_stream(srv.port, {**LONG, "prompt": "hello " * 8000, "echo": True, "logprobs": 5,
                                         "stream": True})
    try:
        running = [(COMPLETIONS, {**LONG, "stream": True, "stream_options": {"include_usage": True}})] * STREAMS
        running += [(COMPLETIONS, LONG)] * IN_FLIGHT
        queued = [(CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000, "ignore_eos": True,
                          "stream": True}), (COMPLETIONS, LONG), ("/", {"prompt": "你好"})] * (QUEUED // 3)
        replies = {"running": [Reply() for _ in running], "queued": [Reply() for _ in queued]}
        threads = []
        for kind, jobs in (("running", running), ("queued", queued)):
            for (path, body), reply in zip(jobs, replies[kind]):
                threads.append(threading.Thread(target=_post, args=(srv.port, path, body, reply), daemon=True))
                threads[-1].start()
            if kind == "running":
                wait_for(lambda: srv.metric("tnl_num_requests_running") == len(running) + STALLED, 60,
                          "every slot to run")
        wait_for(lambda: srv.metric("tnl_num_requests_waiting") == len(queued), 30, "the queue to fill")
        t_signal = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(GRACE_S + 30)
        code = srv.proc.wait(30)
    finally:
        srv.stop()
        stalled.close()
    log = srv.log()
    streams, in_flight = replies["running"][:STREAMS], replies["running"][STREAMS:]

    # every queued request: a 503 in OpenAI's error shape at once, not after the grace period
    for r in replies["queued"]:
        assert r.status == 503 and r.content_type == "application/json", (r, log[-3000:])
        assert r.json()["error"]["type"] == "service_unavailable" and "shutting down" in r.json()["error"]["message"]
        assert r.t_status - t_signal < 1.5, r
    # every stream ran on until the deadline, then ended as aborted: a final chunk, usage, [DONE]
    for r in streams:
        assert r.status == 200 and r.error is None, (r.status, r.error, r.body[-300:])
        events = r.events()
        assert events[-1] == "data: [DONE]", events[-3:]
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finals[-1] == "abort" and finals.count(None) == len(finals) - 1, finals[-3:]
        assert chunks[-1]["usage"]["completion_tokens"] > 0
        assert r.t_end - t_signal > GRACE_S - 0.5, r.t_end - t_signal
    # a non-streaming request still running at the deadline: a clean 503, not a cut connection
    for r in in_flight:
        assert r.status == 503 and r.content_type == "application/json", (r, log[-3000:])
        assert r.json()["error"]["type"] == "service_unavailable"
        assert r.t_status - t_signal > GRACE_S - 0.5
    assert code == 0, log[-3000:]
    # the stalled client was cut a second after the deadline, long before uvicorn's own backstop
    assert "cutting 1 connections whose clients stopped reading" in log
    assert _log_time(log, "Finished server process") - _log_time(log, "shutting down:") < GRACE_S + 2
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-5000:]
    # the access log says what the clients got
    access = [line for line in log.splitlines() if "tnl.access" in line and " /metrics " not in line
              and " /health " not in line]
    aborted = STREAMS + STALLED
    assert sum(" POST /v1/completions 200 " in line and line.endswith("aborted") for line in access) == aborted
    assert sum(" 503 " in line for line in access) == QUEUED + IN_FLIGHT, "\n".join(access)
    assert len(access) == STREAMS + STALLED + IN_FLIGHT + QUEUED, "\n".join(access)


# ---- 2. DNS rebinding, cross-site posts, security headers ------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:6006", "127.0.0.1.nip.io", "localhost.evil.example",
                                  "tnl.example"])
def test_a_foreign_host_name_is_refused_on_loopback(server, host):
    """A page on evil.example whose name was rebound to 127.0.0.1 sends `Host: evil.example`."""
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/", {"prompt": "你好", "max_new_tokens": 2}),
                               ("GET", "/", None)):
        r = requests.request(method, server.url + path, json=body, headers={"Host": host}, timeout=30)
        assert r.status_code == 400, (method, path, r.status_code, r.text[:200])
        error = r.json()["error"]
        assert error["param"] is None and "--allowed-hosts" in error["message"] and host.split(":")[0] in error["message"]


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1", "127.0.0.1:{port}", "[::1]",
                                  "[::1]:{port}", "LocalHost.", "tnl.localhost:{port}", "127.0.0.2", "myhost:{port}"])
def test_loopback_host_names_are_served(server, host):
    # (a name without a dot, such as this machine's own, is in no public DNS: no web page can rebind it)
    r = requests.get(server.url + "/v1/models", headers={"Host": host.format(port=server.port)}, timeout=30)
    assert r.status_code == 200, r.text


def test_allowed_hosts_flag(open_server):
    for host in ("tnl.example", "TNL.example:8443", "other.example", "localhost", f"127.0.0.1:{open_server.port}"):
        assert requests.get(open_server.url + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200, host
    r = requests.get(open_server.url + "/v1/models", headers={"Host": "evil.example"}, timeout=30)
    assert r.status_code == 400 and "--allowed-hosts" in r.json()["error"]["message"]


@pytest.mark.parametrize("host,allowed,foreign_served", [
    ("127.0.0.1", (), False),
    ("127.0.0.1", ("*",), True),
    ("0.0.0.0", (), True),                # reachable by its address from elsewhere: any Host, as before
    ("0.0.0.0", ("tnl.example",), False),
])
def test_which_hosts_are_checked(model_dir, host, allowed, foreign_served):
    """The app itself, in-process (no engine: /health says 503 when the Host passes)."""
    from starlette.testclient import TestClient

    from tnl.server.app import build_app
    from tnl.server.config import ServerConfig

    client = TestClient(build_app(None, ServerConfig(model=model_dir, host=host, allowed_hosts=allowed)))
    assert client.get("/health", headers={"Host": "localhost:6006"}).status_code == 503
    status = client.get("/health", headers={"Host": "evil.example"}).status_code
    assert status == (503 if foreign_served else 400)


BODY = '{"prompt": "你好", "max_new_tokens": 2}'


@pytest.mark.parametrize("content_type", ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:1"])
def test_cross_site_post_without_json_type_is_refused(server, content_type, origin):
    """The posts a page on another site can send without a CORS preflight (None: a Blob body)."""
    headers = {"Origin": origin} | ({"Content-Type": content_type} if content_type else {})
    before = server.metric("tnl_generation_tokens_total")
    r = requests.post(server.url + "/", data=BODY.encode(), headers=headers, timeout=30)
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert "application/json" in error["message"] and "--cors-origins" in error["message"]
    assert server.metric("tnl_generation_tokens_total") == before


def test_tutorial_posts_still_work(server):
    # curl -d '{"prompt":"你好"}' (a form type, no Origin), requests.post(json=...), and the page's own origin
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "application/json"},
                    {"Content-Type": "text/plain", "Origin": server.url},
                    {"Content-Type": "text/plain", "Origin": f"http://localhost:{server.port}"},
                    {"Content-Type": "application/json", "Origin": "http://evil.example"}):  # the browser preflights
        r = requests.post(server.url + "/", data=BODY.encode(), headers=headers, timeout=60)
        assert r.status_code == 200 and set(r.json()) == {"response", "status", "time"}, (headers, r.text)
    assert requests.post(server.url, json={"prompt": "你好", "max_new_tokens": 2}, timeout=60).status_code == 200


def test_cors_origins_may_post_any_type(open_server):
    r = requests.post(open_server.url + "/", data=BODY.encode(), timeout=60,
                      headers={"Content-Type": "text/plain", "Origin": "http://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example", r.text
    r = requests.post(open_server.url + "/", data=BODY.encode(), timeout=60,
                      headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code == 403


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css", "/docs", "/favicon.ico",
                                  "/v1/models", "/static/docs/swagger-ui.css"])
def test_security_headers(server, path):
    r = requests.get(server.url + path, timeout=30)
    assert r.status_code == 200
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split(";") if d.strip()}
    assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert "'unsafe-inline'" not in r.headers["content-security-policy"] and "unsafe-eval" not in csp["script-src"]
    if path in ("/", "/static/app.js"):   # the chat page: no inline script, no eval, nothing from elsewhere
        assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"] and csp["connect-src"] == ["'self'"]
    if path == "/docs":   # Swagger UI's one inline script is allowed by its hash, nothing else inline
        assert [s for s in csp["script-src"] if s.startswith("'sha256-")], csp


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_pages_work_under_their_csp(server):
    """The chat page and /docs in Chromium: no CSP violation, and both still work."""
    playwright = pytest.importorskip("playwright.sync_api")
    model = requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    violations = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
            page.on("pageerror", lambda e: violations.append(str(e)))
            page.goto(server.url + "/")
            playwright.expect(page.locator("#model")).to_have_text(f"model: {model}")
            page.locator("#settings summary").click()
            page.get_by_label("Max tokens").fill("4")
            page.get_by_label("Message").fill("hello")
            page.get_by_label("Message").press("Enter")
            playwright.expect(page.locator(".msg.assistant")).to_have_count(1)
            playwright.expect(page.get_by_role("button", name="Send")).to_be_enabled()
            page.goto(server.url + "/docs")
            playwright.expect(page.locator(".swagger-ui .info .title")).to_contain_text("tnl")
            page.locator('.opblock-summary-path[data-path="/v1/chat/completions"]').click()
            playwright.expect(page.locator(".opblock.is-open")).to_contain_text("Request body")
        finally:
            browser.close()
    assert not violations, violations


# ---- 3. idle, slow and too many connections --------------------------------------------------------

def _closed_within(socks: list[socket.socket], timeout: float, trickle: bytes | None = None) -> dict[int, bytes]:
    """Wait until the server closes every socket; each index maps to what it sent before closing.
    With `trickle`, each socket that got nothing yet sends those bytes every 0.25 s meanwhile (a
    slowloris client)."""
    got = {i: b"" for i in range(len(socks))}
    open_ = set(range(len(socks)))
    deadline = time.monotonic() + timeout
    next_trickle = time.monotonic()
    while open_ and time.monotonic() < deadline:
        readable, _, _ = select.select([socks[i] for i in open_], [], [], 0.05)
        for s in readable:
            i = socks.index(s)
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            got[i] += data
            if not data:
                open_.discard(i)
        if trickle is not None and time.monotonic() >= next_trickle:
            for i in [i for i in open_ if not got[i]]:
                try:
                    socks[i].send(trickle)
                except OSError:   # reset: the server is done with this one
                    open_.discard(i)
            next_trickle += 0.25
    assert not open_, f"{len(open_)} of {len(socks)} connections still open after {timeout} s"
    return got


def test_idle_and_slowloris_connections_are_closed(server):
    n = 300   # of each
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(n)]
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(n)]
    try:
        t0 = time.monotonic()
        for s in slow:
            s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode())
        got = _closed_within(slow, HEADER_TIMEOUT_S + 3, trickle=b"X-Padding: 1\r\n")
        assert time.monotonic() - t0 < HEADER_TIMEOUT_S + 2
        assert all(g.startswith(b"HTTP/1.1 408 ") for g in got.values()), set(got.values())
        assert json.loads(got[0].split(b"\r\n\r\n", 1)[1])["error"]["code"] == 408
        assert set(_closed_within(idle, 2).values()) == {b""}   # never sent a byte: closed without a word
    finally:
        for s in idle + slow:
            s.close()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_slow_body_is_408(server):
    s = socket.create_connection(("127.0.0.1", server.port))
    try:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 1000\r\n\r\n{{".encode())
        t0 = time.monotonic()
        got = _closed_within([s], BODY_TIMEOUT_S + 3, trickle=b" ")[0]
        assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - t0 < BODY_TIMEOUT_S + 2
        head, body = got.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), head
        assert "--body-timeout-s" in json.loads(body)["error"]["message"]
    finally:
        s.close()


def test_keep_alive_connection_is_reused(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        local = None
        for _ in range(4):  # idle between requests for most of the header timeout: still the same connection
            conn.request("GET", "/v1/models")
            r = conn.getresponse()
            assert r.status == 200 and r.read()
            local = local or conn.sock.getsockname()
            assert conn.sock.getsockname() == local
            time.sleep(HEADER_TIMEOUT_S * 0.6)
        # a stream that runs past the header timeout on the kept-alive connection is not cut
        conn.request("POST", COMPLETIONS, json.dumps({**LONG, "stream": True}), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and conn.sock.getsockname() == local
        t0, lines = time.monotonic(), 0
        while time.monotonic() - t0 < HEADER_TIMEOUT_S * 2:
            assert r.readline(), "the stream ended early"
            lines += 1
        assert lines > 10
    finally:
        conn.close()


def test_connection_cap(open_server):
    held = [socket.create_connection(("127.0.0.1", open_server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        r = requests.get(open_server.url + "/v1/models", timeout=10)
        assert r.status_code == 503, r.text
        assert "--max-connections" in r.json()["error"]["message"] and r.headers["connection"] == "close"
    finally:
        for s in held:
            s.close()
    wait_for(lambda: requests.get(open_server.url + "/v1/models", timeout=10).status_code == 200, 10,
              "a free connection slot")
