"""The decode state kernel (tnl.kernels.triton_decode.recurrent_step_triton) at 7B shapes: time
per layer and bandwidth (float32 state read + written) for each launch shape, against a copy
ceiling measured in the same run.

    python benchmarks/decode_kernel_bench.py --batch 64
"""
from __future__ import annotations

import argparse

import torch

from tnl.bench import measure_ceilings
from tnl.kernels.triton_decode import recurrent_step_triton


def time_ms(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    a = p.parse_args()
    dev = torch.device("cuda")
    copy = measure_ceilings(dev)["copy_GBps"]
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s")
    H, D = a.heads, a.dim
    for B in a.batch:
        slots = torch.randperm(max(B, 8) * 2, device=dev)[:B]
        pool = torch.randn(int(slots.max()) + 1, H, D, D, device=dev)
        q, k, v = (torch.randn(B, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        decay = torch.rand(H, device=dev)
        nbytes = 2 * B * H * D * D * 4
        for bv in (16, 32, 64, 128):
            for warps in (1, 2, 4, 8):
                fn = lambda: recurrent_step_triton(q, k, v, decay, pool, slots, features=True,  # noqa: E731
                                                   block_v=bv, num_warps=warps)
                ms = time_ms(fn)
                ok = bool(torch.isfinite(fn()).all())   # (correctness: tests/test_cuda.py)
                print(f"B {B:4d} BV {bv:4d} warps {warps}: {1e3 * ms:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s "
                      f"({nbytes / ms / 1e6 / copy:.2f} of copy){'' if ok else '  BAD OUTPUT'}", flush=True)


if __name__ == "__main__":
    main()
