"""The `tnl` command as a newcomer meets it: light --help, quiet generate, one system prompt
for every front end, the demo model nameable everywhere, CPU threads, and `tnl bench` on a CPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import requests

from helpers_server import ServerProcess
from tnl.config import DEFAULT_SYSTEM_PROMPT
from tnl.loading import DEMO_MODEL_DIR, available_memory

STATIC_INDEX = os.path.join(os.path.dirname(DEMO_MODEL_DIR), "server", "static", "index.html")


def _run(*args: str, env: dict | None = None, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


def _tnl(*args: str, **kw) -> subprocess.CompletedProcess:
    return _run("-m", "tnl.cli", *args, **kw)


def test_help_imports_no_torch():
    code = ("import sys; from tnl.cli import build_parser; p = build_parser(); p.format_help(); "
            "[p.parse_args([c, '--help']) for c in ()]; print('torch' in sys.modules)")
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    for command in ("serve", "generate", "chat", "bench"):   # every sub-parser is built by --help too
        r = _tnl(command, "--help")
        assert r.returncode == 0 and "--threads" in r.stdout and "--revision" in r.stdout, (command, r.stderr)


def test_generate_is_quiet_unless_verbose():
    args = ("generate", "--device", "cpu", "--temperature", "0", "--max-tokens", "4", "你好")
    r = _tnl(*args)
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == "", r.stderr
    r = _tnl("-v", *args)
    assert r.returncode == 0 and " INFO " in r.stderr


def test_generate_chat_and_post_root_agree_on_the_system_prompt(tmp_path):
    """The same greedy 你好 through `tnl generate --chat` and the tutorial's POST /: one default
    system message, so one answer; --system '' changes it."""
    n = 24
    r = _tnl("generate", "--chat", "--device", "cpu", "--temperature", "0", "--max-tokens", str(n), "--json", "你好")
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    with ServerProcess(DEMO_MODEL_DIR, "--max-num-seqs", "2", log_path=str(tmp_path / "server.log")) as srv:
        seed = requests.post(srv.url, json={"prompt": "你好", "max_new_tokens": n}, timeout=60).json()
    assert seed["response"] == cli["text"] and cli["text"]
    r = _tnl("generate", "--chat", "--system", "", "--device", "cpu", "--temperature", "0", "--max-tokens", str(n),
             "--json", "你好")
    none = json.loads(r.stdout)
    assert none["prompt_token_ids"] != cli["prompt_token_ids"]
    assert DEFAULT_SYSTEM_PROMPT in open(STATIC_INDEX, encoding="utf-8").read()   # the web page's default


def test_demo_is_a_model_name_everywhere(tmp_path):
    r = _tnl("generate", "--model", "demo", "--device", "cpu", "--temperature", "0", "--max-tokens", "4", "--json",
             "你好")
    assert r.returncode == 0, r.stderr
    r2 = _tnl("generate", "--device", "cpu", "--temperature", "0", "--max-tokens", "4", "--json", "你好")
    assert json.loads(r.stdout)["token_ids"] == json.loads(r2.stdout)["token_ids"]
    # "demo" is the bundled model even where ./demo exists (the repository has one: the training scripts)
    with ServerProcess("demo", "--max-num-seqs", "1", log_path=str(tmp_path / "server.log")) as srv:
        assert requests.get(srv.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "tnl-demo"


@pytest.mark.parametrize("threads,expected", [(None, "1"), ("3", "3")])
def test_cpu_threads(threads, expected):
    """The demo model (a few M parameters) runs on one thread unless --threads says otherwise;
    an explicit OMP_NUM_THREADS is left alone."""
    code = (f"from tnl import LLM; import torch; LLM(device='cpu', threads={threads}); "
            f"print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == expected
    r = _run("-c", "from tnl import LLM; import torch; LLM(device='cpu'); print(torch.get_num_threads())",
             env={"OMP_NUM_THREADS": "2"})
    assert r.stdout.strip().splitlines()[-1] == "2"


def test_threads_scale_with_model_size():
    code = ("import torch; torch.set_num_threads(8); from tnl.config import ModelConfig; "
            "from tnl.model.weights import RANDOM_7B; from tnl.loading import set_cpu_threads; "
            "set_cpu_threads(ModelConfig.from_dict(RANDOM_7B), None); print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "8"   # a 7B: as many threads as torch would use


def test_bench_on_cpu_defaults_to_the_demo(tmp_path):
    out = tmp_path / "bench.json"
    r = _tnl("bench", "--device", "cpu", "--batch-sizes", "1", "2", "--prompt-len", "8", "--output-len", "4",
             "--prefill-len", "32", "--context-lens", "64", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["params_B"] < 0.1   # the demo, not a 7B
    assert [row["batch"] for row in res["decode"]] == [1, 2] and res["decode"][0]["decode_tok_s"] > 0
    assert "--model demo" in r.stderr
    r = _tnl("bench", "--model", "demo", "--device", "cpu", "--batch-sizes", "1", "--prompt-len", "4",
             "--output-len", "2", "--prefill-len", "--context-lens")
    assert r.returncode == 0, r.stderr


def test_bench_refuses_a_7b_that_cannot_fit_in_memory():
    avail = available_memory()
    if avail is None or avail > 30e9:
        pytest.skip("this machine has room for a float32 7B; the refusal is for machines without it")
    r = _tnl("bench", "--model", "random-7b", "--device", "cpu", "--batch-sizes", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert re.search(r"random-7b in float32 needs 2\d\.\d GB .* available", r.stderr), r.stderr
    assert "--model demo" in r.stderr
