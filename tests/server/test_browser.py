"""The web chat page (GET /) in a real headless Chromium, driven by Playwright, against a real
`python -m tnl.server` subprocess on a loopback port.

The server runs with --api-key, so the key field, its localStorage copy and the 401 message are
exercised by every test. The model is the bundled demo model when it exists, else a tiny random
checkpoint whose head can never pick byte-fallback or special tokens: its greedy replies are
gibberish but always valid UTF-8, so any U+FFFD on the page would be the page's own decoding bug.

Screenshots go to test-artifacts/ at the repo root.
"""
from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from helpers_model import random_state_dict, tiny_config, write_checkpoint
from helpers_server import ServerProcess
from helpers_tokenizer import CHATML_MARKERS, build_test_tokenizer

CHROMIUM = "/usr/bin/chromium"
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install playwright)"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_DIR = os.path.join(REPO, "src", "tnl", "demo")
ARTIFACTS = os.path.join(REPO, "test-artifacts")
API_KEY = "page-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SYSTEM = "You are a helpful assistant."  # the page's default system prompt
WAIT_MS = 20_000


def make_page_model(directory: str) -> str:
    """Test tokenizer + a random untied model whose lm_head rows for byte pieces, control
    tokens (<unk>, <s>, </s>) and the ChatML markers are zero: their logit is 0 while the best
    ordinary piece's is well above it, so greedy replies never end early and never hold a
    broken UTF-8 sequence."""
    import sentencepiece as spm
    import torch

    build_test_tokenizer(directory)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))
    cfg = tiny_config(vocab_size=400, tie_word_embeddings=False)
    sd = random_state_dict(cfg, seed=2, std=0.3)
    banned = [i for i in range(sp.get_piece_size())
              if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in CHATML_MARKERS]
    sd["lm_head.weight"][torch.tensor(banned)] = 0.0
    return write_checkpoint(directory, cfg, sd)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    if os.path.exists(os.path.join(DEMO_DIR, "model.safetensors")):
        model_dir = DEMO_DIR
    else:
        model_dir = make_page_model(str(tmp / "tiny-random"))
    with ServerProcess(model_dir, "--api-key", API_KEY, log_path=str(tmp / "server.log")) as srv:
        srv.model_name = requests.get(srv.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
        yield srv


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A server whose replies never end by themselves (the tiny model above), for the Stop test:
    the demo model ends its answers with <|im_end|> after a few dozen tokens, sooner than a
    click can land."""
    tmp = tmp_path_factory.mktemp("browser-long")
    with ServerProcess(make_page_model(str(tmp / "tiny-random")), "--api-key", API_KEY,
                       log_path=str(tmp / "server.log")) as srv:
        srv.model_name = requests.get(srv.url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (empty localStorage); uncaught page errors fail the test."""
    context = browser.new_context(viewport={"width": 820, "height": 900})
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def screenshot(page, name: str) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, name))


def open_chat(page, url: str, model_name: str, max_tokens: int) -> None:
    """Load the page, enter the API key, set temperature 0 and max tokens, and wait for the
    model name (it is fetched with the key)."""
    page.goto(url + "/")
    # A fresh context has no key: the page explains the 401 and opens Settings at the key field.
    expect(page.get_by_role("alert")).to_contain_text("This server needs an API key")
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("API key").blur()  # the change event saves the key and reloads the model name
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill(str(max_tokens))
    expect(page.locator("#model")).to_have_text(f"model: {model_name}")


def send(page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def wait_reply_done(page) -> None:
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def assistant_texts(page) -> list[str]:
    return page.locator(".msg.assistant").evaluate_all("els => els.map(e => e.textContent)")


def api_reply(url: str, messages: list[dict], max_tokens: int) -> str:
    """The same chat through the API, non-streaming and greedy."""
    r = requests.post(url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": messages, "temperature": 0, "max_tokens": max_tokens})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_model_name_and_api_key(page, server):
    page.goto(server.url + "/")
    # No key yet: the 401 from /v1/models is explained and the key field is shown.
    expect(page.get_by_role("alert")).to_contain_text("This server needs an API key")
    expect(page.get_by_label("API key")).to_be_visible()
    expect(page.locator("#model")).to_have_text("model: unknown")

    page.get_by_label("API key").fill("wrong-key")
    page.get_by_label("API key").blur()
    expect(page.get_by_role("alert")).to_contain_text("needs an API key (invalid API key)")

    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("API key").blur()
    expect(page.locator("#model")).to_have_text(f"model: {server.model_name}")
    expect(page.get_by_role("alert")).to_be_hidden()

    page.reload()  # the key is kept in localStorage
    expect(page.locator("#model")).to_have_text(f"model: {server.model_name}")
    assert page.get_by_label("API key").input_value() == API_KEY


def test_reply_matches_api_over_two_turns(page, server):
    open_chat(page, server.url, server.model_name, max_tokens=40)
    first = "Show me:\n```python\nprint('<b>hi</b>')\n```\nthanks 😀"
    send(page, first)
    wait_reply_done(page)
    # The user's fenced code is a code block, and the HTML in it is text, not markup.
    user = page.locator(".msg.user").first
    expect(user.locator("pre code")).to_have_text("print('<b>hi</b>')")
    assert user.locator("b").count() == 0
    assert user.text_content() == "Show me:\nprint('<b>hi</b>')thanks 😀"

    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}]
    reply1 = api_reply(server.url, turns, 40)
    assert reply1 and assistant_texts(page) == [reply1]

    # The second turn is answered with the whole conversation as its context.
    send(page, "and the 线性 state?")
    wait_reply_done(page)
    turns += [{"role": "assistant", "content": reply1}, {"role": "user", "content": "and the 线性 state?"}]
    reply2 = api_reply(server.url, turns, 40)
    assert assistant_texts(page) == [reply1, reply2]
    assert reply2 != api_reply(server.url, [turns[0], turns[-1]], 40), "history made no difference"
    screenshot(page, "browser-chat.png")

    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".msg")).to_have_count(0)


STOP_TEST_MAX_TOKENS = 200_000


def test_stop_cancels_on_the_server(page, long_server):
    server = long_server
    # far more tokens than a CPU makes before the click lands (2000 once finished first on a
    # loaded CI machine: the Stop button was already disabled)
    open_chat(page, server.url, server.model_name, max_tokens=STOP_TEST_MAX_TOKENS)
    send(page, "Write a long answer.")
    bubble = page.locator(".msg.assistant")
    # the first token of a long-prompt server on a loaded 2-core CI machine has taken > 20 s
    bubble.wait_for(timeout=3 * WAIT_MS)
    # Sample the reply while it streams: each sample is longer and extends the one before.
    samples = []
    deadline = time.monotonic() + 3 * WAIT_MS / 1000
    while len(samples) < 4 and time.monotonic() < deadline:
        text = bubble.text_content()
        if text and (not samples or len(text) > len(samples[-1])):
            samples.append(text)
        time.sleep(0.05)
    assert len(samples) == 4, f"the reply did not grow while streaming: {samples}"
    assert all(b.startswith(a) for a, b in zip(samples, samples[1:]))

    page.get_by_role("button", name="Stop").click(timeout=3 * WAIT_MS)   # a page busy appending tokens, on a loaded CI machine, took > 20 s to take the click
    expect(page.get_by_text("stopped", exact=True)).to_be_visible()
    wait_reply_done(page)
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()

    # The disconnect aborted the request in the engine: its state slot is free, long before
    # all tokens could have been generated, and the access log says so.
    deadline = time.monotonic() + 15
    while server.metric("tnl_state_slots_used", headers=AUTH) != 0.0:
        assert time.monotonic() < deadline, "the state slot was not freed after Stop"
        time.sleep(0.1)
    line = None
    while line is None:
        line = re.search(r"POST /v1/chat/completions .*out=(\d+).* aborted", server.log())
        assert line or time.monotonic() < deadline, f"no aborted request in the server log:\n{server.log()}"
        time.sleep(0.1)
    assert int(line.group(1)) < STOP_TEST_MAX_TOKENS
    stopped = bubble.text_content()
    time.sleep(0.3)
    assert bubble.text_content() == stopped, "the reply kept growing after Stop"
    screenshot(page, "browser-stopped.png")


class SplittingProxy:
    """A loopback TCP proxy in front of the server that forwards each block of the server's
    bytes in two writes 20 ms apart, cut just after the first byte of a multi-byte UTF-8
    character, so the page's fetch() reads end in the middle of a character as they can on
    a slow network."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, split: bool) -> None:
        try:
            while data := src.recv(65536):
                cut = next((i + 1 for i, b in enumerate(data) if b >= 0xC0), None) if split else None
                if cut is not None:
                    dst.sendall(data[:cut])
                    time.sleep(0.02)
                    data = data[cut:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.listener.close()


# Counts the page's stream reads that end inside a character (a strict decode of them fails).
COUNT_SPLIT_READS = """
window.splitReads = 0;
const read = ReadableStreamDefaultReader.prototype.read;
ReadableStreamDefaultReader.prototype.read = async function () {
  const result = await read.call(this);
  if (result.value) {
    try { new TextDecoder("utf-8", { fatal: true }).decode(result.value); } catch { window.splitReads++; }
  }
  return result;
};
"""


def test_chinese_split_across_reads(page, server):
    proxy = SplittingProxy(server.port)
    try:
        page.add_init_script(COUNT_SPLIT_READS)
        open_chat(page, proxy.url, server.model_name, max_tokens=30)
        page.reload()  # a reload keeps the key; the controls go back to their defaults
        expect(page.locator("#model")).to_have_text(f"model: {server.model_name}")
        page.get_by_text("Settings", exact=True).click()
        page.get_by_label("Temperature").fill("0")
        page.get_by_label("Max tokens").fill("30")
        send(page, "你好")
        wait_reply_done(page)
        screenshot(page, "browser-chinese.png")
    finally:
        proxy.close()
    expect(page.locator(".msg.user")).to_have_text("你好")
    reply = api_reply(server.url, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"}], 30)
    text = assistant_texts(page)[0]
    assert "\ufffd" not in text
    assert text == reply
    if any(ord(c) > 0x7F for c in reply):
        assert page.evaluate("window.splitReads") > 0, "no read ended mid-character: the proxy did not split"


def test_errors_in_plain_words(page, server):
    open_chat(page, server.url, server.model_name, max_tokens=0)
    send(page, "hello")
    r = requests.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=10,
                      json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 0})
    assert r.status_code == 400
    alert = page.get_by_role("alert")
    expect(alert).to_have_text(f"The server could not answer: {r.json()['error']['message']}")
    # The refused turn is taken back so it can be fixed and sent again.
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.get_by_label("Message")).to_have_value("hello")
    screenshot(page, "browser-error.png")

    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.get_by_label("Max tokens").fill("8")
    page.get_by_role("button", name="Send").click()
    expect(alert).to_contain_text("Cannot reach the server")


def test_docs_render_offline(page, server):
    """/docs is Swagger UI from files the server ships: every request the page makes stays on
    loopback (any other is refused, as behind an air gap or a blocked CDN), without the API key."""
    outside, failed, bad = [], [], []

    def loopback_only(route):
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort("internetdisconnected")

    page.route("**/*", loopback_only)
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("response", lambda r: bad.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(server.url + "/docs")
    expect(page).to_have_title("tnl - Swagger UI")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("tnl")
    chat = page.locator('.opblock-summary-path[data-path="/v1/chat/completions"]')
    expect(chat).to_be_visible()
    chat.click()  # the operation opens with its request body schema, read from /openapi.json
    expect(page.locator(".opblock.is-open")).to_contain_text("Request body")
    expect(page.locator('link[rel~="icon"]')).to_have_attribute("href", "/favicon.ico")
    screenshot(page, "browser-docs.png")
    assert not outside, f"the docs page asked for files off this machine: {outside}"
    assert not failed and not bad, f"requests that failed: {failed + bad}"

    # The docs page and its schema have metrics labels of their own; its files count as /static.
    metrics = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    for route in ("/docs", "/openapi.json", "/static"):
        assert re.search(rf'^tnl_requests_total{{route="{route}",status="200"}} [1-9]', metrics, re.M), route


def test_favicon(page, server):
    r = requests.get(server.url + "/favicon.ico", timeout=10)  # no key, like the page itself
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/vnd.microsoft.icon"
    # an ICO directory (reserved 0, type 1) whose entries point at PNG images inside the file
    reserved, kind, count = struct.unpack_from("<HHH", r.content)
    assert (reserved, kind) == (0, 1) and count >= 1
    for i in range(count):
        size, offset = struct.unpack_from("<II", r.content, 6 + 16 * i + 8)
        assert offset + size <= len(r.content)
        assert r.content[offset:offset + 8] == b"\x89PNG\r\n\x1a\n"

    page.goto(server.url + "/")
    expect(page.locator('link[rel~="icon"]')).to_have_attribute("href", "/favicon.ico")
    width, height = page.evaluate("""async () => {
      const img = new Image(); img.src = "/favicon.ico"; await img.decode();
      return [img.naturalWidth, img.naturalHeight];
    }""")
    assert width == height and width in (16, 32)
