"""A real `tnl` server in a subprocess on a loopback port, over a tiny checkpoint made on disk.

    model_dir = make_tiny_model(tmp_path / "tiny")
    with ServerProcess(model_dir, "--max-num-seqs", "4") as srv:
        requests.post(srv.url + "/", json={"prompt": "你好"})
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import requests

from helpers_model import random_state_dict, tiny_config, write_checkpoint
from helpers_tokenizer import build_test_tokenizer

STARTUP_TIMEOUT_S = 90  # a cold `import torch` on a busy 2-core CI machine


def make_tiny_model(directory) -> str:
    """Tokenizer + a random 3-layer model whose greedy outputs differ from prompt to prompt
    (std 0.3: peaked, varied distributions, so batching mistakes change the text)."""
    directory = os.fspath(directory)
    build_test_tokenizer(directory)
    cfg = tiny_config(vocab_size=400)  # == the test tokenizer's 400 pieces
    write_checkpoint(directory, cfg, random_state_dict(cfg, seed=2, std=0.3))
    return directory


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` until it is true; an AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m tnl.server --model DIR --port P [args]`, logging to a file."""

    def __init__(self, model_dir: str, *args: str, log_path: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(model_dir, f"server-{self.port}.log")
        self.args = [sys.executable, "-m", "tnl.server", "--model", model_dir, "--port", str(self.port),
                     "--device", "cpu", *args]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        # one intra-op thread: tiny matmuls gain nothing from more, and CI cores are shared
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while starting:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def metric(self, name: str, headers: dict | None = None) -> float:
        """One unlabelled sample from GET /metrics."""
        text = requests.get(self.url + "/metrics", headers=headers, timeout=5).text
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        if m is None:
            raise KeyError(f"{name} not in /metrics:\n{text}")
        return float(m.group(1))

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
