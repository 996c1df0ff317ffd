"""benchmarks/accuracy.py at toy sizes, run as a user runs it (a subprocess, a real text file, real
JSON), so that the script behind BENCHMARKS.md's accuracy tables keeps running."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("every careful engine keeps its state small while the long prompt flows through many quiet "
         "layers and the tests watch each number that the kernels write").split()


def run(args: list[str], tmp_path) -> dict:
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "accuracy.py"), *args, "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| variant |" in proc.stdout       # the markdown table
    return json.loads(out.read_text())


def test_demo_model_at_toy_sizes(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(30)).capitalize() + "."
                                for i in range(40)))
    out = run(["--text", str(text), "--seq-len", "64", "--step-tokens", "16", "--min-tokens", "120", "--prompts", "4",
               "--new-tokens", "8", "--long-len", "200", "--floor-len", "64", "--chunk", "64"], tmp_path)
    tf = out["teacher_forced"]
    ref = tf["fp32 weights, fp32 state"]
    assert ref["tokens"] >= 120 and ref["max_abs_dlogprob"] == 0 and math.isfinite(ref["ppl"])
    for name, row in tf.items():
        if name != "fp32 weights, fp32 state":   # each differs from the float engine (a 16-bit state too:
            assert 0 < row["mean_abs_dlogprob"] < 1, (name, row)  # the rows cross chunk ends), but not wildly
    assert out["greedy"]["fp32 weights, fp32 state"]["identical"] == 1
    assert all(g["prompts"] == 4 for g in out["greedy"].values())
    long = out["long"]
    assert long["fp32 weights, fp32 state, token by token (first 64)"]["buckets"][0]["mean_abs_dlogprob"] < 1e-4
    assert long["fp32 weights, bf16 state, token by token"]["tokens"] == 200


def test_random_weights_path_on_cpu(tmp_path):
    out = run(["--model", "random-tiny", "--rand-batch", "2", "--rand-prompt", "32", "--rand-decode", "4"], tmp_path)
    v = out["variants"]
    assert v["bf16 weights, fp32 state"]["prefill_rel_err"] == 0
    assert 1e-4 < v["int8 weights, fp32 state"]["prefill_rel_err"] < 5e-2
    assert 0 < v["bf16 weights, bf16 state"]["decode_rel_err"] < 5e-2
