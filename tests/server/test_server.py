"""The HTTP server over real HTTP: a `python -m tnl.server` subprocess on a loopback port, a tiny
checkpoint on disk, and real clients (curl, requests, openai, raw sockets).

Servers: `server` (session: most tests), `keyed_server` (--api-key, one slot, one waiting place,
CORS), and one per graceful-shutdown test.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import openai
import pytest
import requests

from helpers_server import ServerProcess, make_tiny_model, wait_for

MAX_PROMPT_TOKENS = 128
API_KEY = "sk-test-0123456789"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-server-model"))


@pytest.fixture(scope="session")
def server(model_dir):
    # async scheduling (the CUDA default) on the CPU too: every server test runs through it
    srv = ServerProcess(model_dir, "--max-num-seqs", "16", "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
                        "--log-prompts", "--async-scheduling")
    srv.start()
    with open(srv.log_path, encoding="utf-8") as f:
        assert "async scheduling on" in f.read()
    yield srv
    code = srv.stop()
    assert code == 0, srv.log()


@pytest.fixture(scope="session")
def llm(model_dir):
    """The offline API over the same checkpoint: the reference for texts and logprobs."""
    from tnl import LLM
    return LLM(model_dir, device="cpu", progress=False)


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def seed_answer(llm) -> str:
    """What the tutorial's api.py answers to {"prompt": "你好"}: the chat template over [system,
    user], greedy, max_new_tokens=512, special tokens skipped."""
    return llm.chat([SYSTEM, {"role": "user", "content": "你好"}], greedy(512))[0].outputs[0].text


def greedy(max_tokens, **kw):
    from tnl import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


# ---- the seed tutorial's contract --------------------------------------------------------------

SEED_RESPONSE = re.compile(r'^\{"response":"(?:[^"\\]|\\.)*","status":200,"time":"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"\}$')


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary")
def test_tutorial_curl(server, seed_answer):
    # The tutorial's command, byte for byte, with the test server's port.
    cmd = ["curl", "-X", "POST", server.url, "-H", "Content-Type: application/json", "-d", '{"prompt": "你好"}']
    out = subprocess.run(cmd, capture_output=True, timeout=60, check=True).stdout.decode()
    assert SEED_RESPONSE.match(out), out  # compact, keys in the tutorial's order, its time format
    assert json.loads(out)["response"] == seed_answer


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary")
def test_tutorial_curl_without_content_type(server):
    # api.py reads the body with request.json(), whatever the Content-Type (curl -d sends a form type).
    cmd = ["curl", "-s", "-X", "POST", server.url, "-d", '{"prompt": "你好", "max_new_tokens": 4}']
    out = subprocess.run(cmd, capture_output=True, timeout=60, check=True).stdout.decode()
    assert SEED_RESPONSE.match(out), out


def test_tutorial_requests_client(server, seed_answer):
    # The tutorial's client, unchanged except for the port.
    def get_completion(prompt):
        headers = {'Content-Type': 'application/json'}
        data = {"prompt": prompt}
        response = requests.post(url=server.url, headers=headers, data=json.dumps(data))
        return response.json()['response']

    assert get_completion('你好') == seed_answer


def test_seed_history_and_options(server, llm):
    turns = [["你好", "你好！"], ["hello", "world"]]
    as_messages = [{"role": r, "content": c} for u, a in turns for r, c in (("user", u), ("assistant", a))]
    a = requests.post(server.url, json={"prompt": "模型", "history": turns, "max_new_tokens": 6}).json()
    b = requests.post(server.url, json={"prompt": "模型", "history": as_messages, "max_new_tokens": 6}).json()
    assert a["response"] == b["response"]
    expected = llm.chat([SYSTEM, *as_messages, {"role": "user", "content": "模型"}], greedy(6))[0].outputs[0].text
    assert a["response"] == expected
    sampled = requests.post(server.url, json={"prompt": "hi", "max_new_tokens": 3, "temperature": 0.7,
                                              "top_p": 0.9})
    assert sampled.status_code == 200


# ---- OpenAI API ------------------------------------------------------------------------------

def test_models(client, server, model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [model_dir.rstrip("/").split("/")[-1]]


def test_chat_matches_offline(client, llm, server):
    messages = [{"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=server_model(client), messages=messages, max_tokens=10, temperature=0)
    expected = llm.chat(messages, greedy(10))[0]
    assert r.choices[0].message.content == expected.outputs[0].text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=server_model(client), messages=[{"role": "user", "content": "线性 注意力"}], max_tokens=12,
              temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=server_model(client), messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert len(tok.top_logprobs) == 3
        assert tok.logprob <= 0 and math.isclose(tok.logprob, tok.top_logprobs[0].logprob, rel_tol=1e-6)
        assert [t.logprob for t in tok.top_logprobs] == sorted((t.logprob for t in tok.top_logprobs), reverse=True)


def test_chat_n_and_seed(client):
    kw = dict(model=server_model(client), messages=[{"role": "user", "content": "the model"}], max_tokens=8,
              temperature=1.0, n=3, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # sample j uses seed + j
    assert 3 <= a.usage.completion_tokens <= 24


def test_completions_matches_offline(client, llm):
    prompts = ["hello world", "the state layer"]
    r = client.completions.create(model=server_model(client), prompt=prompts, max_tokens=8, temperature=0)
    expected = llm.generate(prompts, greedy(8))
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.outputs[0].text for o in expected]
    assert r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)


def test_completions_token_id_prompts_and_stop(client, llm):
    ids = llm.tokenizer.encode("you are a helpful assistant")
    r = client.completions.create(model=server_model(client), prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
    expected = llm.generate([ids, ids[:3]], greedy(6))
    assert [c.text for c in r.choices] == [o.outputs[0].text for o in expected]
    full = r.choices[0].text
    if len(full) > 2:  # a stop string cuts the text before it
        stop = full[2:4]
        cut = client.completions.create(model=server_model(client), prompt=[ids], max_tokens=6, temperature=0,
                                        stop=[stop])
        assert cut.choices[0].text == full[:full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_completions_stream(client):
    kw = dict(model=server_model(client), prompt="hello", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_echo_logprobs_equal_offline_scoring(client, llm):
    """What lm-evaluation-harness sends: echo, logprobs, max_tokens 0 (or 1), token-id prompts."""
    ids = llm.tokenizer.encode("the model reads a long prompt and writes an answer")
    k = 3
    ref = llm.generate([ids], greedy(0, prompt_logprobs=k))[0].prompt_logprobs
    r = client.completions.create(model=server_model(client), prompt=[ids], max_tokens=0, echo=True, logprobs=k,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    tok = llm.tokenizer
    for i in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[i], ref[i][ids[i]], rel_tol=1e-5, abs_tol=1e-5)
        expected_top = {tok.token_text(t): v for t, v in ref[i].items()}
        assert lp.top_logprobs[i].keys() == expected_top.keys()
        for t, v in expected_top.items():
            assert math.isclose(lp.top_logprobs[i][t], v, rel_tol=1e-5, abs_tol=1e-5)
    assert lp.tokens == [tok.token_text(t) for t in ids]
    assert r.choices[0].text == tok.decode(ids, skip_special_tokens=False)
    assert r.usage.completion_tokens == 0
    # lm-eval's loglikelihood request: max_tokens 1, read token_logprobs[ctxlen:-1]
    r1 = client.completions.create(model=server_model(client), prompt=[ids, ids[:5]], max_tokens=1, echo=True,
                                   logprobs=1, temperature=0)
    assert len(r1.choices) == 2
    assert r1.choices[0].logprobs.token_logprobs[1:-1] == pytest.approx(lp.token_logprobs[1:], rel=1e-5, abs=1e-5)
    assert len(r1.choices[1].logprobs.tokens) == 6


def test_unknown_fields_are_ignored(server):
    body = {"prompt": "hi", "max_tokens": 2, "user": "me", "some_future_field": {"x": 1}, "metadata": None}
    r = requests.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text


def test_concurrent_streams_match_solo(server, client):
    """32 streaming clients at once (16 slots: some wait) each get the text they get alone."""
    prompts = [f"{w} {i}" for i, w in enumerate(["hello", "线性", "the state", "你好 世界"] * 8)]
    model = server_model(client)

    def solo(p):
        return client.completions.create(model=model, prompt=p, max_tokens=10, temperature=0).choices[0].text

    alone = [solo(p) for p in prompts]
    assert len(set(alone)) > 8  # the test model is not degenerate: batching mistakes would show

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        async def one(p):
            text = []
            stream = await aclient.completions.create(model=model, prompt=p, max_tokens=10, temperature=0,
                                                      stream=True)
            async for chunk in stream:
                text.append(chunk.choices[0].text)
            return "".join(text)

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    assert asyncio.run(together()) == alone


def _open_raw_stream(url: str, body: dict, headers: dict | None = None) -> socket.socket:
    """POST a streaming request on a raw socket and read up to the first SSE event."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n{extra}\r\n".encode() + payload)
    got = b""
    while b"data: " not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got
    return sock


def test_client_disconnect_frees_slot(server):
    sock = _open_raw_stream(server.url, {"prompt": "hello", "max_tokens": 100000, "ignore_eos": True,
                                         "stream": True})
    # (the gauge is read from the engine's last step: wait for it rather than race it)
    wait_for(lambda: server.metric("tnl_state_slots_used") >= 1, 15, "the stream's slot to show")
    sock.close()
    wait_for(lambda: server.metric("tnl_state_slots_used") == 0 and server.metric("tnl_num_requests_running") == 0,
              15, "the dropped stream's slot to be freed")
    assert requests.get(server.url + "/health").status_code == 200


def test_non_stream_client_disconnect_aborts(server):
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps({"prompt": "hello", "max_tokens": 100000, "ignore_eos": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    wait_for(lambda: server.metric("tnl_state_slots_used") >= 1, 15, "the request to start")
    sock.close()
    wait_for(lambda: server.metric("tnl_state_slots_used") == 0, 15, "the abandoned request's slot to be freed")


# ---- bad inputs ----------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
NAN_BODY = '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'

BAD_INPUTS = [
    # (route, body (dict, or raw str), status, param named in the error)
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content"),
    (CHAT, {"messages": MSG, "temperature": -1}, 400, "temperature"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    (CHAT, NAN_BODY, 400, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": MSG, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 10 ** 7}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": "5"}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"messages": MSG, "n": 0}, 400, "n"),
    (CHAT, {"messages": MSG, "stop": [""]}, 400, "stop"),
    (CHAT, {"messages": MSG, "stop": 5}, 400, "stop"),
    (CHAT, {"messages": MSG, "seed": 1.5}, 400, "seed"),
    (CHAT, {"messages": MSG, "presence_penalty": 3}, 400, "presence_penalty"),
    (CHAT, {"messages": MSG, "logprobs": "yes"}, 400, "logprobs"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": MSG, "stop_token_ids": [99999]}, 400, "stop_token_ids"),
    (CHAT, {"messages": MSG, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    (CHAT, {"messages": MSG, "top_k": -2}, 400, "top_k"),
    (CHAT, {"messages": MSG, "model": "gpt-4"}, 404, "model"),
    (CHAT, '{"messages": [', 400, None),
    (CHAT, "[1, 2]", 400, None),
    (COMPLETIONS, {"max_tokens": 2}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[]]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": {"text": "hi"}}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [5, 99999]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[5, 6], [-1]]}, 400, "prompt[1]"),
    (COMPLETIONS, {"prompt": "hello " * 300}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "hi", "echo": "x"}, 400, "echo"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "bye"}, 400, "suffix"),
    (COMPLETIONS, {"prompt": "hi", "model": "nope"}, 404, "model"),
    ("/", {}, 400, "prompt"),
    ("/", {"prompt": 5}, 400, "prompt"),
    ("/", {"prompt": ""}, 400, "prompt"),
    ("/", '{"prompt": "你好"', 400, None),
    ("/", '"just a string"', 400, None),
    ("/", {"prompt": "hi", "max_new_tokens": -1}, 400, "max_new_tokens"),
    ("/", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/", {"prompt": "hi", "history": [["only one"]]}, 400, "history"),
    ("/", {"prompt": "hi", "history": "nope"}, 400, "history"),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/detokenize", {"tokens": [99999]}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/v1/nothing-here", {}, 404, None),
]


@pytest.mark.parametrize("route,body,status,param", BAD_INPUTS,
                         ids=[f"{r}-{i}" for i, (r, *_rest) in enumerate(BAD_INPUTS)])
def test_bad_input(server, route, body, status, param):
    if isinstance(body, str):
        r = requests.post(server.url + route, data=body.encode(), headers={"Content-Type": "application/json"})
    else:
        r = requests.post(server.url + route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert err["param"] == param, err
    if param is not None:
        assert param.split("[")[0] in err["message"], err
    assert "Traceback" not in r.text
    assert requests.get(server.url + "/health").status_code == 200


def test_prompt_limit_message_gives_both_numbers(server):
    r = requests.post(server.url + COMPLETIONS, json={"prompt": list(range(3, 3 + MAX_PROMPT_TOKENS + 1))})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert str(MAX_PROMPT_TOKENS + 1) in msg and str(MAX_PROMPT_TOKENS) in msg


def test_openai_routes_need_a_json_content_type(server):
    # (only the tutorial's POST / reads JSON whatever the type, as its api.py did)
    r = requests.post(server.url + COMPLETIONS, data=b'{"prompt": "hi"}',
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]


def test_bad_json_message(server):
    r = requests.post(server.url + CHAT, data=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert "malformed JSON" in r.json()["error"]["message"]


# ---- operations routes --------------------------------------------------------------------

def test_tokenize_detokenize(server, llm):
    r = requests.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"] == llm.tokenizer.encode("hello world") and r["count"] == len(r["tokens"])
    back = requests.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "hello world"}
    chat = requests.post(server.url + "/tokenize", json={"messages": MSG}).json()
    assert chat["tokens"] == llm.tokenizer.apply_chat_template(MSG, add_generation_prompt=True, tokenize=True)


def test_metrics(server, client):
    client.completions.create(model=server_model(client), prompt="hello", max_tokens=3, temperature=0)
    text = requests.get(server.url + "/metrics").text
    for name in ("tnl_time_to_first_token_seconds_count", "tnl_inter_token_latency_seconds_count",
                 "tnl_e2e_request_latency_seconds_count", "tnl_queue_time_seconds_count",
                 "tnl_prompt_tokens_total", "tnl_generation_tokens_total", "tnl_num_requests_running",
                 "tnl_num_requests_waiting", "tnl_state_slots_used", "tnl_state_slots_total"):
        assert re.search(rf"^{name} ", text, re.M), name
    assert server.metric("tnl_state_slots_total") == 16
    assert server.metric("tnl_generation_tokens_total") >= 3
    assert server.metric("tnl_time_to_first_token_seconds_count") >= 1
    assert re.search(r'^tnl_requests_total\{route="/v1/completions",status="200"\} [1-9]', text, re.M)


def test_engine_counters(server, client):
    """steps / prefill tokens / decode rows count exactly one request's work (CPU: no async
    scheduling, so a 7-token prompt is one prefill step and 4 tokens need 3 decode steps)."""
    names = ("tnl_engine_steps_total", "tnl_engine_prefill_steps_total", "tnl_engine_prefill_tokens_total",
             "tnl_engine_decode_tokens_total", "tnl_engine_idle_seconds_total", "tnl_engine_device_busy_seconds_total",
             "tnl_engine_prefill_step_device_seconds_total")
    before = {n: server.metric(n) for n in names}
    out = client.completions.create(model=server_model(client), prompt=[5, 6, 7, 8, 9, 10, 11], max_tokens=4,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    after = {n: server.metric(n) for n in names}
    assert after["tnl_engine_steps_total"] - before["tnl_engine_steps_total"] == 4
    assert after["tnl_engine_prefill_steps_total"] - before["tnl_engine_prefill_steps_total"] == 1
    assert after["tnl_engine_prefill_tokens_total"] - before["tnl_engine_prefill_tokens_total"] == 7
    assert after["tnl_engine_decode_tokens_total"] - before["tnl_engine_decode_tokens_total"] == 3
    assert after["tnl_engine_idle_seconds_total"] > before["tnl_engine_idle_seconds_total"] > 0
    assert after["tnl_engine_device_busy_seconds_total"] == 0   # no CUDA timing on the CPU
    assert after["tnl_engine_prefill_step_device_seconds_total"] == 0


def test_page_docs_and_schema(server):
    page = requests.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert requests.get(server.url + "/docs").status_code == 200
    schema = requests.get(server.url + "/openapi.json").json()
    assert {"get", "post"} <= set(schema["paths"]["/"])   # the chat page and the seed API
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
            "/health", "/metrics"} <= set(schema["paths"])


def test_access_log(server):
    r = requests.post(server.url + COMPLETIONS, json={"prompt": "hello", "max_tokens": 2, "temperature": 0})
    rid = r.headers["x-request-id"]
    wait_for(lambda: rid in server.log(), 5, "the access-log line")
    line = next(li for li in server.log().splitlines() if rid in li and "tnl.access" in li)
    assert "POST /v1/completions 200" in line and "in=" in line and "out=2" in line
    assert "prompt=" in line  # --log-prompts
    assert "uvicorn.access" not in server.log()


# ---- API key, queue limit, CORS ----------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(model_dir):
    srv = ServerProcess(model_dir, "--api-key", API_KEY, "--max-num-seqs", "1", "--max-waiting", "1",
                        "--cors-origins", "http://example.com")
    srv.start()
    yield srv
    assert srv.stop() == 0, srv.log()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}],
                         ids=["missing", "wrong", "not-bearer"])
@pytest.mark.parametrize("method,route", [("POST", "/"), ("POST", CHAT), ("POST", COMPLETIONS),
                                          ("GET", "/v1/models"), ("POST", "/tokenize"), ("GET", "/metrics")])
def test_api_key_refused(keyed_server, headers, method, route):
    r = requests.request(method, keyed_server.url + route, json={"prompt": "你好"}, headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


def test_api_key_accepted(keyed_server):
    assert requests.get(keyed_server.url + "/health").status_code == 200
    assert requests.get(keyed_server.url + "/").status_code == 200
    r = requests.post(keyed_server.url, json={"prompt": "你好", "max_new_tokens": 3}, headers=AUTH)
    assert r.status_code == 200 and set(r.json()) == {"response", "status", "time"}
    c = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert c.completions.create(model=c.models.list().data[0].id, prompt="hi", max_tokens=2).choices
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_refusals_are_counted_by_route(keyed_server):
    requests.post(keyed_server.url + CHAT, json={})
    text = requests.get(keyed_server.url + "/metrics", headers=AUTH).text
    assert re.search(r'^tnl_requests_total\{route="/v1/chat/completions",status="401"\} [1-9]', text, re.M), text


def test_cors(keyed_server):
    pre = requests.options(keyed_server.url + CHAT, headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.com"
    r = requests.get(keyed_server.url + "/v1/models", headers={"Origin": "http://example.com"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://example.com"


def test_queue_full_is_429(keyed_server):
    body = {"prompt": "hello", "max_tokens": 100000, "ignore_eos": True, "stream": True}
    running = _open_raw_stream(keyed_server.url, body, AUTH)  # holds the only slot
    # the next one takes the only waiting place: it gets no answer until the slot frees
    host, port = keyed_server.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    waiting = socket.create_connection((host, int(port)), timeout=30)
    waiting.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    try:
        wait_for(lambda: keyed_server.metric("tnl_num_requests_waiting", AUTH) == 1, 15, "a waiting request")
        r = requests.post(keyed_server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}, headers=AUTH)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        running.close()
        waiting.close()
    wait_for(lambda: keyed_server.metric("tnl_state_slots_used", AUTH) == 0
              and keyed_server.metric("tnl_num_requests_waiting", AUTH) == 0, 15, "both requests to be aborted")


# ---- graceful shutdown ------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_shutdown_lets_inflight_stream_finish(model_dir, sig):
    srv = ServerProcess(model_dir, "--graceful-shutdown-s", "20")
    srv.start()
    try:
        result = {}
        first_chunk = threading.Event()

        def stream():
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            chunks = []
            for chunk in c.completions.create(model=server_model(c), prompt="hello", max_tokens=200, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}):
                chunks.append(chunk)
                first_chunk.set()
            result["chunks"] = chunks

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(30)
        srv.proc.send_signal(sig)
        t.join(60)
        chunks = result["chunks"]
        assert chunks[-1].usage.completion_tokens == 200
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert srv.proc.wait(30) == 0, srv.log()
        assert "engine shut down" in srv.log()
    finally:
        srv.stop()


def server_model(c: openai.OpenAI) -> str:
    return c.models.list().data[0].id
