"""Structured output over HTTP, on a real server (loopback) of the bundled demo model: OpenAI's
response_format (json_object, json_schema; the `openai` client's .parse()), vLLM's
structured_outputs (json, regex, choice, grammar), streamed or not, n > 1, logprobs; max_tokens
cuts with "length"; bad constraints are 400s naming the field, and the server keeps serving.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Literal

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from helpers_server import ServerProcess

pytest.importorskip("xgrammar")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_DIR = os.path.join(REPO, "src", "tnl", "demo")
MESSAGES = [{"role": "user", "content": "Describe a pet."}]
PET_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10}, "kind": {"enum": ["cat", "dog", "fish"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 30}}, "required": ["name", "kind", "age"],
    "additionalProperties": False}
COMPACT = {"disable_any_whitespace": True}


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structured")
    with ServerProcess(DEMO_DIR, "--max-num-seqs", "8", "--served-model-name", "demo",
                       log_path=str(tmp / "server.log")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, route: str, body: dict) -> requests.Response:
    return requests.post(server.url + route, json={"model": "demo", **body}, timeout=120)


def test_openai_parse_returns_the_pydantic_object(client):
    """client.chat.completions.parse (and the older client.beta.chat.completions.parse) send the
    model's strict JSON Schema as response_format and parse the answer into a Pet."""
    parsers = [client.chat.completions.parse] if hasattr(client.chat.completions, "parse") else []
    if hasattr(client, "beta") and hasattr(client.beta, "chat"):
        parsers.append(client.beta.chat.completions.parse)
    assert parsers, openai.__version__
    for parse in parsers:
        for kw in (dict(temperature=0), dict(temperature=1.0, seed=5)):
            done = parse(model="demo", messages=MESSAGES, response_format=Pet, max_tokens=450, **kw)
            msg = done.choices[0].message
            assert done.choices[0].finish_reason == "stop", msg.content
            assert isinstance(msg.parsed, Pet) and msg.parsed == Pet.model_validate_json(msg.content)


def test_json_schema_chat_stream_n_logprobs(server):
    """response_format json_schema, n = 3 sampled, streamed and not: the same (seeded) answers,
    each valid; logprobs come with every token, of the constrained distribution (finite for the
    token taken)."""
    body = dict(messages=MESSAGES, response_format={"type": "json_schema", "json_schema": {
        "name": "pet", "schema": PET_SCHEMA, "strict": True}}, n=3, temperature=1.0, seed=7, max_tokens=450,
        logprobs=True, top_logprobs=2)
    whole = post(server, "/v1/chat/completions", body).json()
    texts = [c["message"]["content"] for c in whole["choices"]]
    for c, text in zip(whole["choices"], texts):
        assert c["finish_reason"] == "stop", text
        jsonschema.validate(json.loads(text), PET_SCHEMA)
        lps = c["logprobs"]["content"]
        assert "".join(t["token"] for t in lps[:-1]) == text   # (the last token: the stop token)
        assert all(t["logprob"] > -9999 for t in lps)
    assert len(set(texts)) > 1   # three samples, not one
    r = requests.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=120)
    streamed = ["" for _ in texts]
    for line in r.iter_lines():
        if line.startswith(b"data: {"):
            for c in json.loads(line[6:])["choices"]:
                streamed[c["index"]] += c["delta"].get("content") or ""
    assert streamed == texts


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_structured_outputs_kinds(server, route):
    """vLLM's structured_outputs on both routes, n = 4 sampled: json, regex, choice, grammar."""
    grammar = 'root ::= "(" num ("+" num){0,2} ")"\nnum ::= [1-9] [0-9]?'
    cases = [({"json": PET_SCHEMA, **COMPACT}, lambda t: jsonschema.validate(json.loads(t), PET_SCHEMA) is None),
             ({"regex": r"[A-Z][a-z]{1,6} [0-9]{2}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{1,6} [0-9]{2}", t)),
             ({"choice": ["red", "green", "sky blue"]}, lambda t: t in ("red", "green", "sky blue")),
             ({"grammar": grammar}, lambda t: re.fullmatch(r"\([1-9][0-9]?(?:\+[1-9][0-9]?){0,2}\)", t))]
    prompt = {"prompt": "Answer:"} if route == "/v1/completions" else {"messages": MESSAGES}
    for so, ok in cases:
        r = post(server, route, dict(prompt, structured_outputs=so, n=4, temperature=1.2, seed=3, max_tokens=100))
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            text = c["text"] if "text" in c else c["message"]["content"]
            assert c["finish_reason"] == "stop" and ok(text), (so, text)


def test_completions_stream_logprobs_regex(server):
    """/v1/completions with a regex, n = 2 seeded, logprobs: the stream's text and tokens are the
    whole answer's, and each text full-matches."""
    regex = r"(ab|cd){2,4}-[0-9]{3}"
    body = dict(prompt="Code:", structured_outputs={"regex": regex}, n=2, temperature=1.0, seed=11, max_tokens=40,
                logprobs=2)
    whole = post(server, "/v1/completions", body).json()["choices"]
    r = requests.post(server.url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=120)
    texts, tokens = ["", ""], [[], []]
    for line in r.iter_lines():
        if line.startswith(b"data: {"):
            for c in json.loads(line[6:])["choices"]:
                texts[c["index"]] += c["text"]
                tokens[c["index"]] += (c["logprobs"] or {}).get("tokens", [])
    for c, text, toks in zip(whole, texts, tokens):
        assert c["finish_reason"] == "stop" and re.fullmatch(regex, c["text"]), c["text"]
        assert (text, toks) == (c["text"], c["logprobs"]["tokens"])
        assert all(v > -9999 for v in c["logprobs"]["token_logprobs"])


def test_json_object_and_text(server):
    """json_object: the answer is a JSON object (or its beginning, if max_tokens cuts it: "length");
    response_format text changes nothing."""
    for route, prompt in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "Hi"})):
        r = post(server, route, dict(prompt, response_format={"type": "json_object"}, temperature=0, max_tokens=40))
        c = r.json()["choices"][0]
        text = c["text"] if "text" in c else c["message"]["content"]
        assert text.lstrip().startswith("{"), text
        if c["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
        plain, as_text = (post(server, route, dict(prompt, temperature=0, max_tokens=12, **extra)).json()
                          for extra in ({}, {"response_format": {"type": "text"}}))
        assert plain["choices"] == as_text["choices"]


def test_max_tokens_cut_is_length(server):
    r = post(server, "/v1/chat/completions", dict(messages=MESSAGES, max_tokens=3, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA}}))
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "length" and c["message"]["content"].startswith("{")
    assert r.json()["usage"]["completion_tokens"] == 3


def test_curl_json_schema(server):
    """The README's curl example."""
    body = {"messages": MESSAGES, "max_tokens": 200, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA}}}
    out = subprocess.run(["curl", "-s", server.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=120, check=True).stdout
    jsonschema.validate(json.loads(json.loads(out)["choices"][0]["message"]["content"]), PET_SCHEMA)


BAD = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}},
     "response_format.json_schema.schema", "missing"),
    ("/v1/completions", {"structured_outputs": {"json": {"type": "string", "pattern": "[a-"}}},
     "structured_outputs.json", "Unclosed"),
    ("/v1/completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "JSON"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "regular"),
    ("/v1/completions", {"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least 1"),
    ("/v1/chat/completions", {"structured_outputs": {"grammar": 'root ::= "a" |'}}, "structured_outputs.grammar",
     "EBNF"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= nothing_here"}}, "structured_outputs.grammar",
     "nothing_here"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs", "not both"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "exactly one"),
    ("/v1/completions", {"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs",
     "exactly one"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
]


@pytest.mark.parametrize("route,extra,param,needle", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_constraint_is_400_naming_the_field(server, route, extra, param, needle):
    prompt = {"prompt": "Hi"} if route == "/v1/completions" else {"messages": MESSAGES}
    r = post(server, route, dict(prompt, max_tokens=5, **extra))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err
    ok = post(server, route, dict(prompt, max_tokens=5, structured_outputs={"choice": ["fine"]}))
    assert ok.status_code == 200 and "fine" in json.dumps(ok.json()["choices"])   # still serving
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert "Traceback" not in server.log()
