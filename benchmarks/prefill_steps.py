"""Device time of the steps that admit new prompts: k prompts of --prompt-len tokens arriving
while 64 - k sequences decode (a mixed step: decode rows through their CUDA graph, the prompt
chunks eagerly), and the same k prompts alone. Each shape runs twice: a first run that is much
slower than the second shows one-time costs (kernel compilation or autotuning) paid inside a
user's request. Reads the engine's own counters (tnl_engine_prefill_step_device_seconds).

    python benchmarks/prefill_steps.py --model random-7b --ks 1 2 4 8 16 32 64
"""
from __future__ import annotations

import argparse
import time

import torch

from tnl.config import EngineConfig
from tnl.engine import SamplingParams
from tnl.loading import build_engine


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random-7b")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 32, 64])
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="instead: torch.profiler tables of one step prefilling K prompts alone")
    a = p.parse_args()
    eng = build_engine(a.model, engine_config=EngineConfig(max_num_seqs=a.max_num_seqs, max_num_batched_tokens=8192,
                                                         prefill_wave_ms=0),   # steps as they come: their cost
                       progress=False)
    V = eng.model_config.vocab_size
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    long = SamplingParams(max_tokens=100000, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def prompt(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    def settle():
        while eng.core._in_flight is not None or any(r.num_computed < r.num_prompt for r in eng.requests.values()
                                                 if not r.finished):
            eng.step()
        sync()

    def timed_step(k):
        """Add k prompts and run steps until they are computed; device seconds of the prefill steps."""
        before = eng.stats()
        reqs = [eng.add_request(prompt(a.prompt_len), short) for _ in range(k)]
        t0 = time.perf_counter()
        while any(r.num_computed < r.num_prompt for r in reqs):
            eng.step()
        sync()
        wall = time.perf_counter() - t0
        after = eng.stats()
        for r in reqs:
            eng.abort(r.request_id)
        return (after["prefill_step_busy_s"] - before["prefill_step_busy_s"],
                after["prefill_steps"] - before["prefill_steps"], wall)

    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        for _ in range(2):
            timed_step(a.profile)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            dev_s, _, wall = timed_step(a.profile)
        print(f"prefill of {a.profile} x {a.prompt_len} tokens: device {dev_s * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms "
              f"(under the profiler)")
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        print(ka.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
        return
    print(f"{'k':>3} {'decoding':>8} {'steps':>5} {'device ms (1st)':>15} {'device ms (2nd)':>15} {'wall ms (2nd)':>13}")
    for k in a.ks:
        for background in (a.max_num_seqs - k, 0):
            bg = [eng.add_request(prompt(a.prompt_len), long) for _ in range(background)]
            settle()
            for _ in range(3):
                eng.step()
            first = timed_step(k)
            eng.step()
            second = timed_step(k)
            for r in bg:
                eng.abort(r.request_id)
            while eng.has_work:
                eng.step()
            for rid in [rid for rid, r in eng.requests.items() if r.finished]:
                eng.release(rid)
            print(f"{k:3d} {background:8d} {second[1]:5d} {first[0] * 1e3:15.1f} {second[0] * 1e3:15.1f} "
                  f"{second[2] * 1e3:13.1f}", flush=True)


if __name__ == "__main__":
    main()
