"""Scale-out on Ray Serve (issue 17): N replicas against N x one replica, and state-affine
against random routing, each server started and stopped by this script.

    python benchmarks/ray_bench.py --model random-7b --replicas 2 --json ray.json
    python benchmarks/ray_bench.py --model random-7b --replicas 2 --replica-gpus 0.5   # 2 on one GPU
    python benchmarks/ray_bench.py --model DIR --device cpu --replicas 2 --smoke        # a CPU dry run

The model must have no tokenizer (random-7b, or a checkpoint directory without tokenizer.model):
benchmarks/multiturn.py re-sends each turn's output from its `token_id:N` logprob tokens.

Three servers, one after the other, each on a fresh port with an empty prompt cache:
1. plain `tnl serve` (one engine): benchmarks/serve_load.py with `--clients` streaming clients;
2. `tnl serve --ray --num-replicas N --ray-router affine`: serve_load.py with N x `--clients`
   clients and N x the requests, then benchmarks/multiturn.py (multi-turn TTFT);
3. the same with `--ray-router random`: multiturn.py again.
Prints and writes: aggregate tok/s of N replicas / (N x one replica's), and the multi-turn TTFT
p50/p99 and mean cached tokens of turns >= 2, affine against random.

Extra flags after `--` go to every `tnl serve` (for example `-- --max-num-seqs 128`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m tnl.cli serve ...` on a loopback port, its log in `directory`; stop() sends
    SIGTERM (tnl serve --ray then shuts its local Ray instance down) and waits."""

    def __init__(self, directory: str, name: str, flags: list[str], env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(directory, name + ".log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tnl.cli", "serve", "--port", str(self.port), *flags],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **env})

    def wait_healthy(self, timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log_path}: the server exited with {self.proc.returncode}:\n"
                                   + self.tail())
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.log_path}: not healthy after {timeout_s} s:\n" + self.tail())

    def tail(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)   # the session: Ray's processes too
                self.proc.wait()
        self._log.close()


def client(script: str, url: str, args: list[str], out_json: str) -> dict:
    """Run benchmarks/<script> against `url`; its --json result."""
    cmd = [sys.executable, os.path.join(HERE, script), "--url", url, "--json", out_json, *args]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    with open(out_json) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random-7b")
    p.add_argument("--device", default=None, help="passed to tnl serve (default: its own)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-gpus", type=float, default=None,
                   help="GPUs per replica (0.5: two replicas on one GPU; default: tnl serve's)")
    p.add_argument("--clients", type=int, default=64, help="streaming clients per replica")
    p.add_argument("--requests", type=int, default=256, help="requests per replica")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=64000, help="random prompt ids are drawn below this")
    p.add_argument("--conversations", type=int, default=32, help="multi-turn: conversations (concurrent)")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-len", type=int, default=2048)
    p.add_argument("--turn-len", type=int, default=200)
    p.add_argument("--turn-output-len", type=int, default=100)
    p.add_argument("--processes", type=int, default=4, help="serve_load.py's client processes")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script itself on a CPU")
    p.add_argument("--json", default=None)
    p.add_argument("serve_flags", nargs=argparse.REMAINDER, help="after --: flags for every tnl serve")
    a = p.parse_args()
    if a.smoke:
        a.clients, a.requests, a.prompt_len, a.output_len, a.processes = 4, 8, 16, 8, 1
        a.conversations, a.turns, a.system_len, a.turn_len, a.turn_output_len = 4, 2, 32, 8, 4
        a.vocab = min(a.vocab, 6000)
    extra = [f for f in a.serve_flags if f != "--"]
    base = ["--model", a.model, *(["--device", a.device] if a.device else []), *extra]
    ray_base = ["--ray", "--num-replicas", str(a.replicas), "--no-ray-dashboard",
                *(["--replica-gpus", str(a.replica_gpus)] if a.replica_gpus is not None else [])]
    load = ["--prompt-len", str(a.prompt_len), "--output-len", str(a.output_len), "--vocab", str(a.vocab),
            "--logprobs"]
    chat = ["--conversations", str(a.conversations), "--turns", str(a.turns), "--system-len", str(a.system_len),
            "--turn-len", str(a.turn_len), "--output-len", str(a.turn_output_len), "--vocab", str(a.vocab)]

    work = tempfile.mkdtemp(prefix="tnl-ray-bench-")
    env = {"RAY_TMPDIR": work}
    out: dict = {"model": a.model, "replicas": a.replicas, "replica_gpus": a.replica_gpus, "serve_flags": extra,
                 "logs": work}

    def run_server(name: str, flags: list[str], body) -> None:
        srv = Server(work, name, flags, env)
        try:
            out[name + "_ready_s"] = srv.wait_healthy(a.startup_timeout)
            body(srv)
        finally:
            srv.stop()

    def one(srv: Server) -> None:
        n = a.clients
        out["one"] = client("serve_load.py", srv.url, [*load, "--concurrency", str(n), "--requests", str(a.requests),
                                                     "--processes", str(min(a.processes, n))],
                            os.path.join(work, "one.json"))

    def affine(srv: Server) -> None:
        n = a.clients * a.replicas
        out["ray_load"] = client("serve_load.py", srv.url,
                                 [*load, "--concurrency", str(n), "--requests", str(a.requests * a.replicas),
                                  "--processes", str(min(a.processes, n))], os.path.join(work, "ray_load.json"))
        out["affine"] = client("multiturn.py", srv.url, chat, os.path.join(work, "affine.json"))

    def rand(srv: Server) -> None:
        out["random"] = client("multiturn.py", srv.url, chat, os.path.join(work, "random.json"))

    run_server("one", base, one)
    run_server("ray_affine", [*base, *ray_base, "--ray-router", "affine"], affine)
    run_server("ray_random", [*base, *ray_base, "--ray-router", "random"], rand)

    single = out["one"]["output_tok_s"]
    out["scaling"] = out["ray_load"]["output_tok_s"] / (a.replicas * single)
    for policy in ("affine", "random"):
        r = out[policy]
        later = r["cached_tokens_by_turn_mean"][1:]
        out[policy + "_summary"] = {"ttft_p50_s": r["ttft_p50_s"], "ttft_p99_s": r["ttft_p99_s"],
                                    "ttft_p50_turns_2plus_s": r["ttft_p50_by_turn_s"][1:],
                                    "cached_tokens_turns_2plus_mean": sum(later) / max(1, len(later))}
    print(f"one replica: {single:.1f} tok/s; {a.replicas} replicas: {out['ray_load']['output_tok_s']:.1f} tok/s "
          f"= {out['scaling']:.3f} of {a.replicas} x one")
    for policy in ("affine", "random"):
        s = out[policy + "_summary"]
        print(f"{policy:>6} routing: multi-turn TTFT p50 {s['ttft_p50_s']:.3f} s, p99 {s['ttft_p99_s']:.3f} s; "
              f"turns >= 2 p50 {[round(x, 3) for x in s['ttft_p50_turns_2plus_s']]} s, "
              f"cached tokens {s['cached_tokens_turns_2plus_mean']:.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
