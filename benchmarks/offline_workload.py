"""The HTTP benchmark's workload run offline: N requests (random prompt ids, fixed output
length, greedy, ignore_eos) all queued at once on an engine with --max-num-seqs slots; prints
output tok/s over the whole run (prefill included), the baseline for benchmarks/serve_load.py,
with the engine's steps, decode rows per step and the share of the run the device was busy
(CUDA), which serve_load.py reads from the server for comparison.

    python benchmarks/offline_workload.py --requests 256 --max-num-seqs 64 --prompt-len 128 --output-len 128
"""
from __future__ import annotations

import argparse
import json

import torch

from tnl.bench import run_requests
from tnl.config import EngineConfig
from tnl.engine.core import COUNTERS
from tnl.loading import build_engine


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random-7b")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    eng = build_engine(a.model, engine_config=EngineConfig(max_num_seqs=a.max_num_seqs,
                                                           max_num_batched_tokens=a.max_num_batched_tokens,
                                                           max_waiting=a.requests + 1), progress=False)
    g = torch.Generator().manual_seed(0)

    def prompts(n):
        return [torch.randint(3, eng.model_config.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(n)]

    run_requests(eng, prompts(min(a.max_num_seqs, 8)), a.output_len)   # warm-up
    before = eng.stats()
    r = run_requests(eng, prompts(a.requests), a.output_len)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    after = eng.stats()
    d = {k: after[k] - before[k] for k in COUNTERS}
    # run_requests splits the run at "every request has its first token"; the whole run is both
    wall = r["ttft_s"] + r["decode_s"]
    tokens = r["decode_tokens"] + a.requests
    out = {"requests": a.requests, "max_num_seqs": a.max_num_seqs, "output_tokens": tokens, "wall_s": wall,
           "output_tok_s": tokens / wall, "steps": d["steps"], "rows_per_step": d["decode_tokens"] / max(d["steps"], 1),
           "prefill_steps": d["prefill_steps"], "device_busy": d["device_busy_s"] / wall,
           "prefill_step_busy_s": d["prefill_step_busy_s"]}
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
