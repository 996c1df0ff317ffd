"""Hostile and huge request bodies, over real HTTP: body and prompt size limits, tokenization off
the event loop, lone UTF-16 surrogates, deeply nested JSON, a client leaving mid-body, booleans
given as token ids.

Real `python -m tnl.server` subprocesses on loopback ports over a tiny checkpoint, real clients
(requests, raw sockets). Servers: `server` (the default body limit, --max-prompt-tokens 1000, so a
big prompt is answered as soon as it is tokenized) and `body_server` (--max-body-mb 4, the default
prompt limit).
"""
from __future__ import annotations

import argparse
import json
import re
import select
import socket
import time

import pytest
import requests

from helpers_server import ServerProcess, make_tiny_model

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MiB = 2 ** 20
DEFAULT_MAX_BODY = 8 * MiB
DEFAULT_MAX_PROMPT_TOKENS = 1_000_000
MAX_PROMPT_TOKENS = 1000
BODY_LIMIT = 4 * MiB


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-input-model"))


def _clean_exit(srv: ServerProcess) -> None:
    log = srv.log()
    assert srv.proc.returncode == 0, log
    assert "Traceback" not in log and " ERROR " not in log, log


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerProcess(model_dir, "--max-num-seqs", "4", "--max-prompt-tokens", str(MAX_PROMPT_TOKENS)) as srv:
        yield srv
    _clean_exit(srv)


@pytest.fixture(scope="module")
def body_server(model_dir):
    with ServerProcess(model_dir, "--max-num-seqs", "2", "--max-body-mb", str(BODY_LIMIT // MiB)) as srv:
        yield srv
    _clean_exit(srv)


# ---- raw HTTP ----------------------------------------------------------------------------------

def open_request(srv: ServerProcess, path: str, headers: dict[str, str | int]) -> socket.socket:
    """A connection that has sent a POST's request line and headers, and nothing of its body."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{srv.port}", "Content-Type: application/json",
            "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the one response on a Connection: close socket."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def requests_total(srv: ServerProcess, route: str, status: int) -> float:
    text = requests.get(srv.url + "/metrics", timeout=10).text
    m = re.search(rf'^tnl_requests_total{{route="{re.escape(route)}",status="{status}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def post_raw(srv: ServerProcess, path: str, raw: bytes) -> requests.Response:
    return requests.post(srv.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=60)


def assert_error(r: requests.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    r.content.decode("utf-8")   # strict: the error body is valid UTF-8
    err = r.json()["error"]
    assert err["code"] == status and err["param"] == param, err
    return err


# ---- 1. body size, prompt size, tokenization off the event loop ---------------------------------

def test_limit_defaults_and_flags():
    from tnl.server.config import ServerConfig, add_server_args

    d = ServerConfig()
    assert d.max_body_mb == 8 and d.max_prompt_tokens == DEFAULT_MAX_PROMPT_TOKENS
    assert d.engine_config().max_prompt_tokens == DEFAULT_MAX_PROMPT_TOKENS
    parser = add_server_args(argparse.ArgumentParser())
    assert ServerConfig.from_args(parser.parse_args([])) == d
    cfg = ServerConfig.from_args(parser.parse_args(["--max-body-mb", "3", "--max-prompt-tokens", "50"]))
    assert cfg.max_body_mb == 3 and cfg.engine_config().max_prompt_tokens == 50


@pytest.mark.parametrize("path", ["/", COMPLETIONS, CHAT, "/tokenize"])
def test_body_over_the_default_limit_is_refused_from_its_content_length(server, path):
    # 100 MB announced, not a byte of it sent: the 413 comes from the headers alone
    with open_request(server, path, {"Content-Length": 100_000_000}) as sock:
        status, headers, body = read_response(sock)
    assert status == 413 and headers["connection"] == "close"
    err = json.loads(body)["error"]
    assert err["code"] == 413 and err["param"] is None
    assert "--max-body-mb" in err["message"] and "8 MiB" in err["message"], err


def test_chunked_body_is_refused_while_it_is_read(body_server):
    # No Content-Length: the bytes are counted as they arrive, and the 413 comes while the body is
    # still unfinished (its last chunk is never sent).
    before = requests_total(body_server, COMPLETIONS, 413)
    with open_request(body_server, COMPLETIONS, {"Transfer-Encoding": "chunked"}) as sock:
        piece = b"x" * (64 * 1024)
        for _ in range(BODY_LIMIT // len(piece)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"1\r\nx\r\n")   # byte BODY_LIMIT + 1
        status, headers, body = read_response(sock)
    assert status == 413 and headers["connection"] == "close"
    assert "4 MiB" in json.loads(body)["error"]["message"]
    assert requests_total(body_server, COMPLETIONS, 413) == before + 1


def test_body_of_exactly_the_limit_is_read(body_server):
    prompt = {"prompt": "hello world", "max_tokens": 2}
    raw = json.dumps(prompt).encode()
    at_limit = raw + b" " * (BODY_LIMIT - len(raw))   # JSON allows trailing whitespace
    assert post_raw(body_server, COMPLETIONS, at_limit).status_code == 200
    with open_request(body_server, COMPLETIONS, {"Content-Length": BODY_LIMIT + 1}) as sock:
        assert read_response(sock)[0] == 413
    assert requests.get(body_server.url + "/health", timeout=10).status_code == 200


def test_default_prompt_token_limit(body_server):
    ids = [5] * (DEFAULT_MAX_PROMPT_TOKENS + 1)   # 3 MB of JSON: under the body limit
    r = requests.post(body_server.url + COMPLETIONS, json={"prompt": ids, "max_tokens": 1}, timeout=120)
    err = assert_error(r, 400, "prompt")
    assert f"{DEFAULT_MAX_PROMPT_TOKENS + 1} tokens" in err["message"] and "--max-prompt-tokens" in err["message"]


@pytest.mark.parametrize("path,key", [(COMPLETIONS, "prompt"), (CHAT, "messages")])
def test_health_answers_while_a_big_prompt_is_tokenized(server, path, key):
    # ~7 MB of text, 3.4M tokens: under the default body limit, over the prompt limit, so the
    # engine refuses it as soon as it is tokenized. Tokenizing takes seconds; /health must not
    # wait for it, so it is answered first.
    text = "hello world the model 你好 " * 240_000
    value = text if key == "prompt" else [{"role": "user", "content": text}]
    body = json.dumps({key: value, "max_tokens": 1}, ensure_ascii=False).encode()
    assert len(body) < DEFAULT_MAX_BODY
    with open_request(server, path, {"Content-Length": len(body)}) as big:
        big.sendall(body)
        time.sleep(0.3)   # the body reaches the server and its tokenization begins
        assert requests.get(server.url + "/health", timeout=60).status_code == 200
        big_answered_first = bool(select.select([big], [], [], 0)[0])
        status, _, payload = read_response(big)
    assert not big_answered_first, "GET /health waited for another request's tokenization"
    assert status == 400 and json.loads(payload)["error"]["param"] == key, payload[:300]


# ---- 2. lone UTF-16 surrogates -----------------------------------------------------------------

LONE = '"a\\ud800b"'   # JSON text: a high surrogate with no low one after it
SURROGATE_CASES = [
    (COMPLETIONS, '{"prompt": %s, "max_tokens": 1}', "prompt"),
    (COMPLETIONS, '{"prompt": ["ok", %s], "max_tokens": 1}', "prompt"),
    (COMPLETIONS, '{"prompt": %s, "max_tokens": 1, "stream": true}', "prompt"),
    (COMPLETIONS, '{"prompt": "hi", "model": %s}', "model"),
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": %s}', "max_tokens"),
    (COMPLETIONS, '{"prompt": "hi", "logit_bias": {%s: 1}}', "logit_bias"),
    (CHAT, '{"messages": [{"role": "user", "content": %s}]}', "messages[0].content"),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}', "messages[0].content"),
    (CHAT, '{"messages": [{"role": "user", "content": %s}], "stream": true}', "messages[0].content"),
    (CHAT, '{"messages": [{"role": %s, "content": "hi"}]}', "messages[0].role"),
    (CHAT, '{"model": %s, "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}', "max_tokens"),
    ("/", '{"prompt": %s}', "prompt"),
    ("/", '{"prompt": "hi", "history": [["a", %s]]}', "history"),
    ("/", '{"prompt": "hi", "history": [{"role": "user", "content": %s}]}', "history"),
    ("/", '{"prompt": "hi", "max_new_tokens": %s}', "max_new_tokens"),
    ("/tokenize", '{"prompt": %s}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": %s}]}', "messages[0].content"),
    ("/tokenize", '{"model": %s, "prompt": "hi"}', "model"),
    ("/detokenize", '{"model": %s, "tokens": [5]}', "model"),
    ("/detokenize", '{"tokens": %s}', "tokens"),
]


@pytest.mark.parametrize("path,template,param", SURROGATE_CASES)
def test_lone_surrogate_is_a_400_naming_the_field(server, path, template, param):
    r = post_raw(server, path, (template % LONE).encode())
    err = assert_error(r, 400, param)
    assert "\\ud800" in err["message"], err   # the bad character, escaped so it can be shown


def test_surrogate_pair_is_text(server):
    # "\ud83d\ude00" is one character (U+1F600), as JSON spells characters outside the BMP
    r = post_raw(server, COMPLETIONS, b'{"prompt": "hi \\ud83d\\ude00", "max_tokens": 2}')
    assert r.status_code == 200, r.text
    r = post_raw(server, "/tokenize", b'{"prompt": "\\ud83d\\ude00", "add_special_tokens": false}')
    assert r.status_code == 200 and r.json()["tokens"] == requests.post(
        server.url + "/tokenize", json={"prompt": "\U0001F600", "add_special_tokens": False}).json()["tokens"]


def test_error_renderer_escapes_what_utf8_cannot_carry():
    from tnl.server.errors import error_response

    r = error_response("bad \ud800 input", 400, "x\udfff")
    err = json.loads(r.body.decode("utf-8"))["error"]
    assert err["message"] == "bad \\ud800 input" and err["param"] == "x\\udfff"


# ---- 3. deeply nested JSON ---------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", COMPLETIONS, "/tokenize"])
def test_deeply_nested_json_is_a_400(server, path):
    r = post_raw(server, path, b"[" * 100_000 + b"]" * 100_000)
    assert_error(r, 400, None)


@pytest.mark.parametrize("depth", [900, 950, 980, 990, 1000, 1100])
def test_nesting_near_the_recursion_limit_is_a_400(server, depth):
    # depths where json.loads just succeeds and echoing the value in the error message could not
    nested = "[" * depth + "]" * depth
    for path, raw in (("/", '{"prompt": "hi", "history": %s}'), ("/", '{"prompt": %s}'),
                      (COMPLETIONS, '{"prompt": %s}'), (CHAT, '{"messages": %s}')):
        r = post_raw(server, path, (raw % nested).encode())
        assert r.status_code == 400, (path, raw, r.text)


# ---- 4. a client that leaves while its body is read --------------------------------------------

@pytest.mark.parametrize("path", ["/", COMPLETIONS])
def test_disconnect_while_the_body_is_read_is_a_499(server, path):
    before = {code: requests_total(server, path, code) for code in (400, 499, 500)}
    with open_request(server, path, {"Content-Length": 1000}) as sock:
        sock.sendall(b'{"prompt": "' + b"x" * 100)
    deadline = time.monotonic() + 30
    while requests_total(server, path, 499) == before[499] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests_total(server, path, 499) == before[499] + 1
    assert requests_total(server, path, 500) == before[500] and requests_total(server, path, 400) == before[400]
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert re.search(rf"POST {re.escape(path)} 499 ", log), log[-3000:]


# ---- 5. booleans are not token ids -------------------------------------------------------------

@pytest.mark.parametrize("path,body,param", [
    ("/detokenize", {"tokens": [True]}, "tokens[0]"),
    ("/detokenize", {"tokens": [5, False]}, "tokens[1]"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 1, "stop_token_ids": [True]}, "stop_token_ids[0]"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stop_token_ids": [3, False]},
     "stop_token_ids[1]"),
    (COMPLETIONS, {"prompt": [5, True], "max_tokens": 1}, "prompt"),
    (COMPLETIONS, {"prompt": [[5, 6], [True]], "max_tokens": 1}, "prompt"),
])
def test_booleans_are_not_token_ids(server, path, body, param):
    assert_error(requests.post(server.url + path, json=body, timeout=60), 400, param)


def test_int_token_ids_still_work(server):
    assert requests.post(server.url + "/detokenize", json={"tokens": [5, 6]}, timeout=60).status_code == 200
    r = requests.post(server.url + COMPLETIONS, json={"prompt": [5, 6], "max_tokens": 1, "stop_token_ids": [1]},
                      timeout=60)
    assert r.status_code == 200, r.text
