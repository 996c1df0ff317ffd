"""Decode GEMMs of TransNormerLLM-7B: cuBLAS (F.linear) vs tnl's Triton skinny_linear.

For each weight shape and each M (tokens in the step) it times cuBLAS and every candidate Triton
config (tnl.kernels.triton_gemm.candidate_configs), checks each Triton result against an fp32
reference (wrong configs are rejected), and reports the best config per (shape, M), the speedup,
and the whole decode step's GEMM time (30 layers x 4 shapes + lm_head) for cuBLAS, best Triton
and best-of-both. Ceilings measured in the same run: copy bandwidth (read + write) and a read-only
bandwidth (max of torch.sum and a Triton streaming read), so GB/s figures have a reference.

Timing is pure GPU time: CUDA-graph replay of back-to-back calls, divided by the call count.
Weights are cold in L2 as in the real model: the graph cycles through enough copies of W (> 4x
the L2 size together, at least 2) that every call reads its weight from HBM.
GB/s = weight bytes / time.

    tnl tune                                                  # this sweep, then fla's kernels: the card's table
    python -m tnl.kernels.gemm_sweep --json out/gemm.json           # all M, ~900 configs: < 4 min
    python -m tnl.kernels.gemm_sweep --quick --json out/gemm_quick.json   # ~5 configs each: < 90 s

All kernels are compiled up front in parallel threads (triton_gemm.precompile); every config is
checked (eagerly, twice, and after graph replay) before its time counts.

The JSON's "tuned" list is what tnl.kernels.triton_gemm.TunedTable.load reads (tnl --gemm-table PATH).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:          # the CUDA check in main() says what is missing
    triton = tl = None

# name -> (N, K) of the weight [N, K]; how many of each one decode step reads
SHAPES = {"qkvu": (16384, 4096), "out_proj": (4096, 4096), "l12": (22016, 4096),
          "l3": (4096, 11008), "lm_head": (64000, 4096)}
PER_STEP = {"qkvu": 30, "out_proj": 30, "l12": 30, "l3": 30, "lm_head": 1}
DEFAULT_M = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DTYPE = torch.bfloat16  # weights and activations
MIN_CALLS = 12          # calls per captured graph (rounded up to a multiple of the copy count)
COLD_FACTOR = 4         # weight copies together exceed this many L2 sizes


if triton is not None:
    @triton.jit
    def _read_kernel(x_ptr, out_ptr, n_tiles, BLOCK: tl.constexpr, STAGES: tl.constexpr):
        # persistent streaming read: program p sums tiles p, p + P, p + 2P, ... (< 2**31 elements)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
            acc += tl.load(x_ptr + t * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _import_gemm():
    from tnl.kernels import triton_gemm
    return triton_gemm


def time_events(fn, warm: int = 3, reps: int = 10) -> float:
    """Median ms of fn() between CUDA events (for the big ceiling ops, where launch is noise)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def time_graph(fn, n_copies: int, replays: int):
    """fn(i) enqueues one call on weight copy i and returns its output. Captures
    n_copies * ceil(MIN_CALLS / n_copies) back-to-back calls (cycling through the copies, so
    the cycle continues seamlessly from one replay to the next) in one CUDA graph and replays it.
    Returns (median us per call, the graph's last output, the graph): the caller checks the
    output, then drops both to release the graph's memory pool."""
    calls = n_copies * math.ceil(MIN_CALLS / n_copies)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):             # warm-up off the default stream, as capture wants
        for i in range(n_copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            out = fn(i % n_copies)
    g.replay()                                # first replay uploads the graph
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for s, e in ev:
        s.record()
        g.replay()
        e.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in ev)
    return ms[len(ms) // 2] * 1e3 / calls, out, g


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (inf when out has a NaN/inf)."""
    d = (out.float() - ref).abs().max().item()
    return d / max(ref.abs().max().item(), 1e-30) if math.isfinite(d) else math.inf


def ceilings(dev, num_sms: int) -> dict:
    """Copy (read + write) and read-only bandwidth over 1 GiB, GB/s."""
    n = 512 * 1024 * 1024                     # bf16 elements: 1 GiB
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    res = {"bytes": a.numel() * a.element_size()}
    res["copy_GBps"] = 2 * res["bytes"] / time_events(lambda: b.copy_(a)) / 1e6
    res["read_torch_sum_GBps"] = res["bytes"] / time_events(lambda: a.sum(dtype=torch.float32)) / 1e6
    best = 0.0
    for block, warps, per_sm in ((8192, 8, 4), (4096, 4, 8)):
        try:
            grid = num_sms * per_sm
            part = torch.empty(grid, dtype=torch.float32, device=dev)

            def fn(grid=grid, part=part, block=block, warps=warps):
                _read_kernel[(grid,)](a, part, n // block, BLOCK=block, STAGES=4, num_warps=warps)
            best = max(best, res["bytes"] / time_events(fn) / 1e6)
        except Exception as e:                # a ceiling, not the subject: note it and go on
            print(f"triton read kernel (BLOCK={block}) failed: {type(e).__name__}: {e}", file=sys.stderr)
    res["read_triton_GBps"] = best
    res["read_GBps"] = max(res["read_torch_sum_GBps"], best)
    return res


def cuda_alive() -> bool:
    try:
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def bench_shape_m(tg, name, N, K, M, Ws, W0f, n_copies, args, dev, out_dtype) -> dict:
    """One (shape, M): cuBLAS, then every candidate Triton config."""
    x = torch.randn(M, K, device=dev, dtype=DTYPE)
    ref = F.linear(x.float(), W0f)
    wbytes = N * K * 2
    replays = 5 if args.quick else 10
    fp32_out = out_dtype == torch.float32

    def cublas(i):
        y = F.linear(x, Ws[i])
        return y.float() if fp32_out else y

    c_err = rel_err(cublas(0), ref)
    c_us, c_out, g = time_graph(cublas, n_copies, replays)
    del c_out, g
    tol = max(2e-2, 2 * c_err)
    row = {"shape": name, "N": N, "K": K, "M": M, "weight_bytes": wbytes, "n_copies": n_copies,
           "out_dtype": str(out_dtype).replace("torch.", ""),
           "cublas_us": c_us, "cublas_GBps": wbytes / c_us / 1e3, "cublas_rel_err": c_err, "tol": tol,
           "configs": []}

    cands = tg.candidate_configs(M, N, K, quick=args.quick)
    heur = tg.heuristic_config(M, N, K)
    if heur not in cands:
        cands.append(heur)
    for cfg in cands:
        rec = {"name": cfg.name, "config": cfg.to_dict(), "heuristic": cfg == heur}
        row["configs"].append(rec)

        def fn(i, cfg=cfg):
            return tg.skinny_linear(x, Ws[i], config=cfg, out_dtype=out_dtype)

        try:
            # twice eagerly (the first call compiles; the second checks the split-K counters
            # were left at zero), then once more from the graph replay
            err = max(rel_err(fn(0), ref), rel_err(fn(0), ref))
            if err > tol:
                rec.update(error=f"wrong result: rel_err {err:.3g} > {tol:.3g}", rel_err=err)
                continue
            us, out, g = time_graph(fn, n_copies, replays)
            err = max(err, rel_err(out, ref))
            del out, g
            rec["rel_err"] = err
            if err > tol:
                rec["error"] = f"wrong result after graph replay: rel_err {err:.3g} > {tol:.3g}"
                continue
            rec.update(us=us, GBps=wbytes / us / 1e3, speedup=c_us / us)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if not cuda_alive():
                raise RuntimeError(f"CUDA context lost at {name} M={M} {cfg.name}: {rec['error']}") from e
    ok = [r for r in row["configs"] if "us" in r]
    if ok:
        best = min(ok, key=lambda r: r["us"])
        row.update(best=best, triton_us=best["us"], triton_GBps=best["GBps"], speedup=best["speedup"])
    heur_rec = next(r for r in row["configs"] if r["heuristic"])
    row["heuristic_us"] = heur_rec.get("us")
    return row


def bench_gated(tg, rows: list[dict], args, dev, l2: int) -> list[dict]:
    """The GLU's down projection as the model runs it: F.linear(a * b, W) (cuBLAS plus the
    elementwise product) against skinny_linear(ab, W, gated=True) with the best l3 config of
    this run, at each M. Where gated wins decides tnl.kernels.backend.SKINNY_GATED_MAX_M."""
    N, K = SHAPES["l3"]
    n_copies = max(2, math.ceil(COLD_FACTOR * l2 / (N * K * 2)))
    W0 = torch.randn(N, K, device=dev, dtype=DTYPE) * K ** -0.5
    Ws = [W0] + [W0.clone() for _ in range(n_copies - 1)]
    out = []
    print(f"\nl3 with the GLU gate (a * b) @ W.T:\n{'M':>4s} {'cuBLAS+mul us':>13s} {'gated us':>9s} {'speedup':>7s}")
    for r in rows:
        if r["shape"] != "l3" or "best" not in r:
            continue
        M, cfg = r["M"], tg.Config.from_dict(r["best"]["config"])
        ab = torch.randn(M, 2 * K, device=dev, dtype=DTYPE)
        ref = F.linear((ab[:, :K] * ab[:, K:]).float(), W0.float())

        def unfused(i):
            a, b = ab.chunk(2, dim=-1)
            return F.linear(a * b, Ws[i])

        def fused(i):
            return tg.skinny_linear(ab, Ws[i], config=cfg, gated=True)

        err = rel_err(fused(0), ref)
        c_us = time_graph(unfused, n_copies, 10)[0]
        g_us = time_graph(fused, n_copies, 10)[0]
        rec = {"M": M, "config": cfg.to_dict(), "cublas_mul_us": c_us, "gated_us": g_us,
               "speedup": c_us / g_us, "rel_err": err}
        out.append(rec)
        print(f"{M:>4d} {c_us:>13.1f} {g_us:>9.1f} {c_us / g_us:>7.3f}x  (rel_err {err:.2g})", flush=True)
    return out


def step_totals(rows: list[dict], ms: list[int]) -> dict:
    """Per M: the decode step's GEMM time (PER_STEP weights) for cuBLAS, best Triton per shape,
    and the best of both per shape, in us (over the shapes that were run; triton_us is None when
    a shape had no valid Triton config)."""
    out = {}
    for M in ms:
        rs = [r for r in rows if r["M"] == M]
        if not rs:
            continue
        cub = sum(PER_STEP[r["shape"]] * r["cublas_us"] for r in rs)
        both = sum(PER_STEP[r["shape"]] * min(r.get("triton_us", math.inf), r["cublas_us"]) for r in rs)
        tri = None
        if all("triton_us" in r for r in rs):
            tri = sum(PER_STEP[r["shape"]] * r["triton_us"] for r in rs)
        out[M] = {"cublas_us": cub, "triton_us": tri, "best_of_both_us": both,
                  "speedup_triton": cub / tri if tri else None, "speedup_best_of_both": cub / both,
                  "shapes": [r["shape"] for r in rs]}
    return out


def tuned_rows(tg, rows: list[dict]) -> list[dict]:
    """The best config per (m_bucket, N, K), preferring a row measured at M == its bucket."""
    best: dict[tuple, tuple[bool, dict]] = {}
    for r in rows:
        if "best" not in r:
            continue
        key = (tg.m_bucket(r["M"]), r["N"], r["K"])
        exact = r["M"] == key[0]
        if key not in best or (exact and not best[key][0]):
            cfg = tg.Config.from_dict(r["best"]["config"])
            best[key] = (exact, tg.tuned_entry(key[0], r["N"], r["K"], cfg, r["speedup"]))
    return [entry for _, (_, entry) in sorted(best.items())]


def out_dtype_of(name: str, args) -> torch.dtype:
    return torch.float32 if (name == "lm_head" and args.lm_head_fp32) else DTYPE


def print_row(r: dict, read_gbps: float) -> None:
    def pct(gbps):
        return f"{100 * gbps / read_gbps:4.0f}%"
    line = f"{r['shape']:9s} {r['M']:4d} | {r['cublas_us']:8.1f} {r['cublas_GBps']:6.0f} {pct(r['cublas_GBps'])} | "
    n_ok = sum("us" in c for c in r["configs"])
    if "best" in r:
        b = r["best"]
        heur = f"{r['heuristic_us']:8.1f}" if r.get("heuristic_us") else "       -"
        line += (f"{b['name']:30s} {r['triton_us']:8.1f} {r['triton_GBps']:6.0f} {pct(r['triton_GBps'])} "
                 f"{r['speedup']:6.3f}x | {heur} | {n_ok}/{len(r['configs'])}")
    else:
        line += f"{'(no valid Triton config)':30s} | {n_ok}/{len(r['configs'])}"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> dict:
    """The sweep; returns the JSON's object (also written with --json)."""
    p = argparse.ArgumentParser(prog="python -m tnl.kernels.gemm_sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=DEFAULT_M, help="token counts (rows of x)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--json", metavar="PATH", help="write all timings, the best configs and a `tuned` table")
    p.add_argument("--quick", action="store_true", help="a few configs per shape, fewer replays")
    p.add_argument("--lm-head-fp32", action="store_true",
                   help="lm_head with float32 logits: Triton writes fp32 directly, cuBLAS is F.linear().float()")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gemm sweep: needs a CUDA GPU (torch.cuda.is_available() is False)")
    if triton is None:
        sys.exit("gemm sweep: needs triton (pip install triton)")
    tg = _import_gemm()
    torch.backends.cuda.matmul.allow_tf32 = False        # the fp32 reference is a true fp32 GEMM
    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    num_sms = props.multi_processor_count
    t0 = time.perf_counter()
    print(f"{props.name}: {num_sms} SMs, L2 {l2 / 2**20:.0f} MiB, "
          f"torch {torch.__version__}, triton {triton.__version__}")

    ceil = ceilings(dev, num_sms)
    torch.cuda.empty_cache()                              # its 2 GiB of buffers
    read_gbps = ceil["read_GBps"]
    print(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s (read+write), read {read_gbps:.0f} GB/s "
          f"(torch.sum {ceil['read_torch_sum_GBps']:.0f}, triton {ceil['read_triton_GBps']:.0f})", flush=True)

    # compile every kernel the sweep will launch up front, in parallel (minutes when serial)
    t1 = time.perf_counter()
    jobs = []
    for name in args.shapes:
        N, K = SHAPES[name]
        for M in args.m:
            for cfg in tg.candidate_configs(M, N, K, quick=args.quick) + [tg.heuristic_config(M, N, K)]:
                jobs.append((M, N, K, cfg, DTYPE, out_dtype_of(name, args), False))
    try:
        n_kernels, n_failed = tg.precompile(jobs)
        print(f"compiled {n_kernels} kernels for {len(jobs)} (shape, M, config) runs in "
              f"{time.perf_counter() - t1:.0f} s ({n_failed} failed: those configs report the error)", flush=True)
    except Exception as e:      # not fatal: each kernel then compiles at its first call
        print(f"parallel precompile failed ({type(e).__name__}: {e}); compiling lazily", file=sys.stderr)

    result = {"device": props.name, "num_sms": num_sms, "l2_bytes": l2, "torch": torch.__version__,
              "triton": triton.__version__, "quick": args.quick, "ceilings": ceil, "per_step": PER_STEP,
              "rows": [], "step_totals": {}, "tuned": []}

    def save():
        result["step_totals"] = step_totals(result["rows"], args.m)
        result["tuned"] = tuned_rows(tg, result["rows"])
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    print(f"\n{'shape':9s} {'M':>4s} | {'cuBLAS us':>8s} {'GB/s':>6s} {'%read':>5s} | "
          f"{'best Triton config':30s} {'us':>8s} {'GB/s':>6s} {'%read':>5s} {'speedup':>7s} | "
          f"{'heur us':>8s} | ok/tried")
    try:
        for name in args.shapes:
            N, K = SHAPES[name]
            wbytes = N * K * 2
            n_copies = max(2, math.ceil(COLD_FACTOR * l2 / wbytes))
            W0 = torch.randn(N, K, device=dev, dtype=DTYPE) * K ** -0.5
            Ws = [W0] + [W0.clone() for _ in range(n_copies - 1)]    # identical: any copy checks against ref
            W0f = W0.float()
            for M in args.m:
                r = bench_shape_m(tg, name, N, K, M, Ws, W0f, n_copies, args, dev, out_dtype_of(name, args))
                result["rows"].append(r)
                print_row(r, read_gbps)
                save()
            del Ws, W0, W0f
            torch.cuda.empty_cache()
    except RuntimeError as e:
        save()
        sys.exit(f"gemm sweep: stopped: {e}")

    if "l3" in args.shapes:
        result["gated"] = bench_gated(tg, result["rows"], args, dev, l2)
        save()

    totals = step_totals(result["rows"], args.m)
    print("\ndecode step GEMM time (30 x qkvu, out_proj, l12, l3 + 1 x lm_head), us:")
    print(f"{'M':>4s} {'cuBLAS':>9s} {'Triton':>9s} {'best-of-both':>12s} {'x Triton':>8s} {'x both':>7s}")
    for M, t in totals.items():
        tri = (f"{t['triton_us']:9.1f}", f"{t['speedup_triton']:8.3f}") if t["triton_us"] else ("        -",) * 2
        print(f"{M:4d} {t['cublas_us']:9.1f} {tri[0]} {t['best_of_both_us']:12.1f} "
              f"{tri[1]:>8s} {t['speedup_best_of_both']:7.3f}"
              + ("" if len(t["shapes"]) == len(SHAPES) else f"  (shapes: {' '.join(t['shapes'])})"))
    save()
    print(f"\n{len(result['tuned'])} tuned entries; total {time.perf_counter() - t0:.0f} s"
          + (f"; JSON: {args.json}" if args.json else ""))
    return result


if __name__ == "__main__":
    main()
