"""/openapi.json tells the truth: schemathesis (its `st run` CLI, in a subprocess) fuzzes a real
server from the schema it serves and checks that every answer is one the schema documents, with
the documented body, that every request the schema allows is accepted and every one it forbids is
refused, and that nothing is a 5xx.

This file is also the run's hook module (SCHEMATHESIS_HOOKS=test_schemathesis): `before_call`
keeps generated requests short, since the schema allows max_tokens up to 1,000,000.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")

MAX_EXAMPLES = 30      # cases per operation and phase: ~1,400 requests in all, ~15 s on 2 cores
SEED = 20261201
MAX_TOKENS = 4         # generated max_tokens / max_new_tokens above this are lowered to it
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "positive_data_acceptance", "negative_data_rejection",
          "unsupported_method", "allow_header_conformance")
HERE = os.path.dirname(os.path.abspath(__file__))   # this module is st's hook module too
TESTS_DIR = os.path.dirname(HERE)                   # tests/: the helpers


def _integral_floats_to_ints(value):
    """JSON Schema counts 1.0 as an integer and schemathesis sends such numbers on purpose; tnl's
    numbers are strict (protocol.py: 1.0 is not an int), which no schema can say."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_to_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_to_ints(v) for k, v in value.items()}
    return value


@schemathesis.hook
def before_call(context, case, kwargs):
    """Lower generated token budgets to MAX_TOKENS (a valid value stays valid; an invalid one,
    above the cap or below 1, is left as it is) and give the chat and seed routes one when the
    case has none (their defaults are 4096 and 512)."""
    if not isinstance(case.body, dict):
        return
    body = case.body = _integral_floats_to_ints(case.body)
    for key in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
        value = body.get(key)
        if type(value) is int and MAX_TOKENS < value <= 1_000_000:
            body[key] = MAX_TOKENS
    if case.path == "/v1/chat/completions":
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
    elif case.path == "/" and "max_new_tokens" not in body:
        body["max_new_tokens"] = MAX_TOKENS


def tiny_server(model_dir, *args: str):
    # imported here: `st run` imports this module for its hook, which needs no torch
    from helpers_server import ServerProcess, make_tiny_model

    return ServerProcess(make_tiny_model(model_dir), *args)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory.mktemp("tiny-schemathesis"), "--max-num-seqs", "4",
                     "--served-model-name", "tiny") as srv:
        yield srv


def config_toml(schema: dict) -> str:
    """schemathesis.toml: the CHECKS, on every operation but one, positive_data_acceptance, on a
    file upload (a body that is not JSON): no schema can tell a usable file from random bytes.
    (The checks are set here, not with --checks, which would override the per-operation setting.)"""
    lines = ["[checks]", "enabled = false", *(f"{check}.enabled = true" for check in CHECKS)]
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            content = op.get("requestBody", {}).get("content", {})
            if content and "application/json" not in content:
                lines += ["", "[[operations]]", f'include-name = "{method.upper()} {path}"',
                          "checks.positive_data_acceptance.enabled = false"]
    return "\n".join(lines) + "\n"


def run_schemathesis(url: str, workdir) -> tuple[dict, str]:
    """One `st run` over the server's schema: (its JSON report, its console output)."""
    report = os.path.join(workdir, "report.json")
    with open(os.path.join(workdir, "schemathesis.toml"), "w", encoding="utf-8") as f:
        f.write(config_toml(requests.get(url + "/openapi.json", timeout=10).json()))
    cmd = [os.path.join(os.path.dirname(sys.executable), "st"), "run", url + "/openapi.json",
           "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
           "--workers", "1", "--continue-on-failure", "--request-timeout", "60",
           "--generation-database", "none", "--output-sanitize", "false", "--no-color",
           "--report", "json", "--report-json-path", report]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="test_schemathesis",
               PYTHONPATH=os.pathsep.join([HERE, TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if not os.path.exists(report):
        raise AssertionError(f"st run wrote no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    with open(report, encoding="utf-8") as f:
        return json.load(f), proc.stdout + proc.stderr


def test_schemathesis_finds_no_mismatch(server, tmp_path):
    report, output = run_schemathesis(server.url, tmp_path)
    cases = report["test_cases"]
    print(f"schemathesis: {report['operations']['tested']} operations, {cases['generated']} cases, "
          f"{cases['with_failures']} with failures, {report['running_time']:.1f} s")
    assert report["complete"] and report["operations"]["tested"] >= 10, output[-3000:]
    assert not report["failures"] and not report["errors"], output[-20000:]
    assert cases["generated"] >= 500, output[-3000:]   # the run tested something
    log = server.log()
    assert "Traceback" not in log, log[-5000:]


def test_schema_documents_each_error(server):
    """Every operation: no FastAPI 422, a 400 ErrorResponse; a body: 408 and 413 too; the
    generating routes: 429 and 503; only the served model name; OPTIONS / allows GET and POST."""
    schema = requests.get(server.url + "/openapi.json", timeout=10).json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            assert responses["400"]["content"]["application/json"]["schema"] == error_ref, (method, path)
            if "requestBody" in op:
                assert {"408", "413"} <= responses.keys(), (method, path)
    for path in ("/", "/v1/chat/completions", "/v1/completions"):
        assert {"429", "503"} <= schema["paths"][path]["post"]["responses"].keys(), path
    model = schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
    assert {"type": "string", "enum": ["tiny"]} in model["anyOf"]
    tokens = schema["components"]["schemas"]["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert (tokens["minimum"], tokens["maximum"]) == (0, 399)   # the tiny model's 400 pieces
    r = requests.options(server.url + "/", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


def test_keyed_schema_documents_401(tmp_path):
    """With --api-key every operation outside the open paths documents 401 and the bearer scheme."""
    with tiny_server(tmp_path / "tiny", "--api-key", "sk-schema") as srv:
        schema = requests.get(srv.url + "/openapi.json", timeout=10).json()
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    paths = schema["paths"]
    assert "401" in paths["/v1/completions"]["post"]["responses"]
    assert paths["/v1/completions"]["post"]["security"] == [{"apiKey": []}]
    for path, method in (("/health", "get"), ("/", "get")):   # open: no key needed
        assert "401" not in paths[path][method]["responses"] and "security" not in paths[path][method]
