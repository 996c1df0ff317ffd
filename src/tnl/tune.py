"""`tnl tune`: measure this card's kernel table and write it where the server finds it.

Two sweeps, each kernel config checked against the plain-PyTorch result before its time counts:
- the skinny GEMM (tnl.kernels.gemm_sweep): cuBLAS against tnl's Triton configs for every decode
  matmul shape of the 7B at 1-256 rows; the table keeps the best config per (rows, N, K) and
  its speedup, so a shape goes to Triton only where it measured faster;
- fla's prompt kernels (chunk_fwd_kernel_h: every config fla autotunes over; chunk_fwd_kernel_o:
  likewise), on the two prompt shapes a server meets (one 16k-token prompt; eight 128-token
  prompts), summed. The best one is pinned at start-up, so nothing autotunes then (fla's own
  autotuning took 83 s of a cold start).

The table goes to $TNL_CACHE_DIR/tuned/<card>.json (default ~/.cache/tnl/tuned/), which
`tnl serve`, `tnl bench` and LLM(...) then use on this card (their log says which table and
whether it was measured on this card); --output writes elsewhere (then pass --gemm-table).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

FLA_WORKLOADS = {"prompt_16k": [16384], "prompts_8x128": [128] * 8}


def _fla_candidates(kernel) -> list[dict]:
    from tnl.kernels.fla_prefill import _autotuner
    out = []
    for c in _autotuner(kernel).configs:
        out.append({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})
    return out


def sweep_fla(heads: int, head_dim: int, reps: int = 5) -> dict:
    """Time every config of fla's two prompt kernels on this card (7B attention shapes by
    default): {"chunk_fwd_kernel_h": best, "chunk_fwd_kernel_o": best, "timings": ...}."""
    import torch

    from tnl.kernels import torch_ops
    from tnl.kernels.fla_prefill import FlaPrefill, pin_configs, varlen_meta

    dev = torch.device("cuda")
    fla = FlaPrefill(direct=True)
    candidates = {name: _fla_candidates(k) for name, k in fla.kernels.items()}
    g = torch.Generator(device=dev).manual_seed(0)
    slope = torch.linspace(0.01, 0.5, heads, device=dev)
    cases = []
    for wname, lens in FLA_WORKLOADS.items():
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        T = cu[-1]
        q, k, v = (torch.randn(T, heads, head_dim, device=dev, generator=g, dtype=torch.bfloat16) * 0.1
                   for _ in range(3))
        init = torch.randn(len(lens), heads, head_dim, head_dim, device=dev, generator=g) * 0.01
        offsets, ns, pairs = varlen_meta(cu)
        cu_t = torch.tensor(cu, dtype=torch.long, device=dev)
        meta = (torch.tensor(offsets, dtype=torch.long, device=dev),
                torch.tensor(pairs, dtype=torch.long, device=dev).view(-1, 2), ns)
        ref_o, ref_h = torch_ops.varlen_chunk_attention(q.float(), k.float(), v.float(), slope, init.clone(), cu)
        cases.append((wname, (q, k, v, slope, init, cu_t, meta), ref_o, ref_h))

    def time_config(pins: dict) -> dict[str, float] | None:
        pin_configs(fla.kernels, pins)
        out = {}
        for wname, args, ref_o, ref_h in cases:
            try:
                o, h = fla(*args)
                torch.cuda.synchronize()
            except Exception:       # a config this card cannot run (shared memory): skipped
                return None
            err = max(((o.float() - ref_o).abs().max() / ref_o.abs().max().clamp_min(1e-6)).item(),
                      ((h - ref_h).abs().max() / ref_h.abs().max().clamp_min(1e-6)).item())
            if not err < 2e-2:
                return None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fla(*args)
            end.record()
            torch.cuda.synchronize()
            out[wname] = start.elapsed_time(end) / reps
        return out

    result, timings = {}, {}
    fixed = {"chunk_fwd_kernel_o": candidates["chunk_fwd_kernel_o"][0]}
    for name in ("chunk_fwd_kernel_h", "chunk_fwd_kernel_o"):
        rows = []
        for cfg in candidates[name]:
            t = time_config({**fixed, name: cfg})
            rows.append({"config": cfg, "ms": t})
        ok = [r for r in rows if r["ms"] is not None]
        if not ok:
            raise RuntimeError(f"no config of fla's {name} ran correctly on this card")
        best = min(ok, key=lambda r: sum(r["ms"].values()))
        result[name] = fixed[name] = best["config"]
        timings[name] = rows
        print(f"fla {name}: {len(ok)}/{len(rows)} configs ran; best {best['config']}: "
              + ", ".join(f"{w} {ms:.3f} ms" for w, ms in best["ms"].items()), flush=True)
    return {**result, "timings": timings}


def main(a) -> int:
    import torch

    from tnl.kernels import tuned
    if not torch.cuda.is_available():
        print("tnl tune: error: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name()
    out = a.output or tuned.user_table_path(name)
    t0 = time.perf_counter()
    from tnl.kernels import gemm_sweep
    sweep = gemm_sweep.main(["--quick"] if a.quick else [])
    table = {"device": name,
             "about": f"tnl tune on {name}, {datetime.date.today()}, torch {torch.__version__}, "
                      f"triton {sweep.get('triton')}{' (--quick)' if a.quick else ''}",
             "tuned": sweep["tuned"], "step_totals": sweep.get("step_totals"), "ceilings": sweep.get("ceilings")}
    if a.fla:
        try:
            fla = sweep_fla(a.heads, a.head_dim)
            table["fla"] = {k: v for k, v in fla.items() if k != "timings"}
            table["fla_timings"] = fla["timings"]
        except ImportError as e:
            print(f"tnl tune: fla-core not importable ({e}): no fla configs in the table", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, out)
    print(f"tnl tune: wrote {out} ({len(table['tuned'])} skinny-GEMM entries"
          f"{', fla configs' if 'fla' in table else ''}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a few skinny-GEMM configs per shape (~90 s, not ~4 min)")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="where to write the table (default: $TNL_CACHE_DIR/tuned/<card>.json, else "
                        "~/.cache/tnl/tuned/<card>.json, which tnl uses on this card without a flag)")
    p.add_argument("--fla", action=argparse.BooleanOptionalAction, default=True,
                   help="also pick fla's prompt-kernel configs (default on)")
    p.add_argument("--heads", type=int, default=32, help="attention heads of the fla sweep (default: the 7B's 32)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim of the fla sweep (default: the 7B's 128)")
