"""Where a decode step's time goes: kernel table of one eager step (torch.profiler), and the
pure GPU time of a CUDA-graph replay vs. the engine's whole step (host overhead).

    python benchmarks/profile_decode.py --batch-sizes 1 64
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tnl.model.weights import RANDOM_7B, random_model
from tnl.config import EngineConfig
from tnl.engine import LLMEngine, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    a = p.parse_args()
    dev = torch.device("cuda")
    m = random_model(RANDOM_7B, dev, torch.bfloat16)
    eng = LLMEngine(m, None, EngineConfig(max_num_seqs=max(a.batch_sizes), max_num_batched_tokens=4096))
    runner = eng.runner
    for bs in a.batch_sizes:
        reqs = [eng.add_request([5 + i, 6, 7], SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True))
                for i in range(bs)]
        while any(not r.output_token_ids for r in reqs):
            eng.step()
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
        # pure replay time
        g = runner.graphs[bs]
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            g.replay()
        e.record()
        torch.cuda.synchronize()
        replay_ms = s.elapsed_time(e) / 20
        t = time.perf_counter()
        for _ in range(20):
            eng.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t) / 20 * 1e3
        print(f"batch {bs}: graph replay {replay_ms:.3f} ms, engine step {step_ms:.3f} ms "
              f"(host + sampling {step_ms - replay_ms:.3f} ms)")
        # eager step kernel table
        runner.use_graphs = False
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.step()
            torch.cuda.synchronize()
        runner.use_graphs = True
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        for r in reqs:
            eng.abort(r.request_id)
        while eng.has_work:
            eng.step()


if __name__ == "__main__":
    main()
