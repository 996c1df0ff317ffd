"""Server start-up: the port opens before the model is loaded (GET /health 503, then 200), a model
that fails to load ends `python -m tnl.server` with exit code 1, and the flags map onto
ServerConfig / EngineConfig."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import uvicorn

from helpers_model import random_state_dict, tiny_config, write_checkpoint
from helpers_server import free_port, make_tiny_model
from tnl.server.config import ServerConfig, add_server_args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-startup-model"))


def _wait(predicate, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_health_is_503_until_the_model_is_loaded(model_dir):
    """A real uvicorn server in a thread; the (real) engine load waits for a gate."""
    from tnl.config import EngineConfig
    from tnl.engine import AsyncEngine
    from tnl.loading import build_engine
    from tnl.server.app import build_app

    gate = threading.Event()

    def load():
        assert gate.wait(60)
        return AsyncEngine(build_engine(model_dir, device="cpu", engine_config=EngineConfig(max_num_seqs=2)))

    port = free_port()
    app = build_app(None, ServerConfig(model=model_dir, port=port), load_engine=load)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait(lambda: server.started)
        health = requests.get(url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        r = requests.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert "retry-after" in r.headers
        assert requests.get(url + "/metrics").status_code == 200  # scrapeable while loading
        gate.set()
        assert _wait(lambda: requests.get(url + "/health").status_code == 200)
        r = requests.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive()
    assert app.state.tnl.shutting_down  # the lifespan ended and shut the engine down


def _serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tnl.server", "--device", "cpu", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """A user's mistake: exit 1, and stderr is one 'tnl serve: error: ...' line, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "Uvicorn running" not in out, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tnl serve: error: "), out
    return lines[0]


@pytest.mark.parametrize("model", ["/nonexistent", "no-such-thing", "not-a-checkpoint"])
def test_bad_model_is_one_line_before_the_port_opens(tmp_path, model):
    if model == "not-a-checkpoint":
        model = str(tmp_path / model)
        os.mkdir(model)
    line = _one_line_error(_serve("--model", model, "--port", str(free_port())))
    assert model in line
    if "tmp" in model:
        assert "config.json" in line


def test_busy_port_is_one_line_naming_the_flag():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _one_line_error(_serve("--port", str(port)))
    assert str(port) in line and "--port" in line and "in use" in line


def test_load_failure_exits_1_with_one_error_line(tmp_path):
    """A config.json tnl can run, but no weights: the port has opened (the weights load behind
    /health's 503), then the server exits 1 and its last line says why, without a traceback."""
    d = tmp_path / "no-weights"
    d.mkdir()
    write_checkpoint(str(d), tiny_config(), random_state_dict(tiny_config()))
    for f in d.glob("*.safetensors"):
        f.unlink()
    proc = _serve("--model", str(d), "--port", str(free_port()))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tnl serve: error: the model failed to load:") and "weight" in last, out
    # -v keeps the traceback for a bug report
    verbose = subprocess.run([sys.executable, "-m", "tnl.cli", "-v", "serve", "--device", "cpu", "--model", str(d),
                              "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_flags_map_onto_config():
    parser = add_server_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--model", "OpenNLPLab/TransNormerLLM-7B", "--port", "7000", "--max-num-seqs", "8",
                            "--max-prompt-tokens", "4096", "--api-key", "k", "--cors-origins", "http://a,http://b",
                            "--cors-origins", "http://c", "--log-prompts"])
    cfg = ServerConfig.from_args(ns)
    assert cfg.port == 7000 and cfg.host == "127.0.0.1" and cfg.api_key == "k" and cfg.log_prompts
    assert cfg.cors_origins == ("http://a", "http://b", "http://c")
    assert cfg.model_name == "OpenNLPLab/TransNormerLLM-7B"  # a hub id stays whole
    ec = cfg.engine_config()
    assert ec.max_num_seqs == 8 and ec.max_prompt_tokens == 4096 and ec.async_scheduling is None  # auto
    assert ServerConfig.from_args(parser.parse_args(["--no-async-scheduling"])).engine_config().async_scheduling is False
    assert ServerConfig.from_args(parser.parse_args([])).port == 6006
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-num-seqs", "0"])


def test_served_model_name_defaults_to_directory_basename(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    assert ServerConfig(model=str(d) + "/").model_name == "my-model"
    assert ServerConfig(model=str(d), served_model_name="alias").model_name == "alias"
