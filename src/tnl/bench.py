"""`tnl bench`: offline engine speed, each figure next to a ceiling measured in the same run.

Ceilings: device copy bandwidth (bytes read + written) and the bf16 matmul rate.
Decode roofline per step = (weight bytes read once, 8-bit ones with --quantization + each
sequence's state read and written, in --state-dtype) / copy rate.
Prefill floor = 2 * params * tokens / matmul rate.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

from tnl.args import add_model_args
from tnl.config import ModelConfig, engine_config
from tnl.kernels.config import KernelConfig, add_kernel_args, kernel_config_from_args

log = logging.getLogger(__name__)

def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(device) -> dict:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s), medians."""
    if device.type != "cuda":
        return {}
    import torch
    from triton.testing import do_bench
    a = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    copy = 2 * a.numel() * 2 / (ms / 1e3) / 1e9
    del a, b
    x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median")
    mm = 2 * 8192**3 / (ms / 1e3) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return {"copy_GBps": copy, "matmul_TFLOPs": mm}


def weight_bytes(m) -> int:
    """Bytes one decode step must read: every layer matrix (8-bit ones with their scales) and the
    head (the embedding lookup reads one row per sequence)."""
    total = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if "embed_tokens" not in n)
    total += sum(b.numel() * b.element_size() for n, b in m.named_buffers() if n.endswith((".qweight", ".scale")))
    return total + m.head_weight.numel() * m.head_weight.element_size()


def run_requests(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Run a batch through the engine; time prefill (to first tokens) and decode separately."""
    from tnl.engine import SamplingParams
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    dev = engine.device
    _sync(dev)
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, sp) for p in prompts]
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    _sync(dev)
    t1 = time.perf_counter()
    step_times = []
    while engine.has_work:
        s = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - s)
    _sync(dev)
    t2 = time.perf_counter()
    for r in reqs:
        engine.release(r.request_id)
    decoded = sum(len(r.output_token_ids) - 1 for r in reqs)
    return {"ttft_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens": decoded,
            "decode_tok_s": decoded / (t2 - t1) if t2 > t1 else float("nan"),
            "step_ms_median": 1e3 * statistics.median(step_times) if step_times else float("nan")}


def bench(args, kernel_config: KernelConfig | None = None) -> dict:
    import torch

    from tnl.engine import LLMEngine
    from tnl.loading import RANDOM_MODEL, check_host_memory, set_cpu_threads
    from tnl.model.weights import RANDOM_7B, random_model, resolve_dtype
    from tnl.kernels.quant import check_device
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)
    check_device(args.quantization, device)   # before the ceilings and the weights
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out.update(measure_ceilings(device))
    t0 = time.perf_counter()
    if args.model is None:   # the 7B's shapes on a GPU; the demo model on the CPU, where a 7B is ~28 GB
        args.model = RANDOM_MODEL if device.type == "cuda" else "demo"
        log.info("benchmarking --model %s", args.model)
    if args.model == RANDOM_MODEL:
        if device.type == "cpu":
            check_host_memory(f"{RANDOM_MODEL} in {str(dtype).removeprefix('torch.')}",
                              ModelConfig.from_dict(RANDOM_7B).num_params() * dtype.itemsize)
        model = random_model(RANDOM_7B, device, dtype, kernel_config=kernel_config, quantization=args.quantization)
    else:
        from tnl.loading import resolve_model_dir
        from tnl.model.weights import load_model
        model = load_model(resolve_model_dir(args.model, args.source, args.cache_dir, args.revision),
                           device=str(device), dtype=args.dtype, kernel_config=kernel_config,
                           quantization=args.quantization)
    out["load_s"] = time.perf_counter() - t0
    cfg = model.config
    if device.type == "cpu":
        set_cpu_threads(cfg, args.threads)
    wbytes = weight_bytes(model)
    sbytes = cfg.state_bytes(args.state_dtype)
    out.update(params_B=cfg.num_params() / 1e9, weight_GB=wbytes / 1e9, state_MB_per_seq=sbytes / 1e6,
               quantization=args.quantization, state_dtype=args.state_dtype)
    out["kernels"] = model.backend.names()
    max_bs = max(args.batch_sizes)
    t0 = time.perf_counter()
    ec = engine_config(max_num_seqs=max_bs, max_num_batched_tokens=max(args.max_num_batched_tokens, max_bs),
                      max_waiting=1 << 20, cuda_graphs=not args.no_cuda_graphs,
                      async_scheduling=args.async_scheduling, enable_prefix_caching=args.enable_prefix_caching,
                      state_dtype=args.state_dtype)
    engine = LLMEngine(model, None, ec)
    out["engine_init_s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)

    def prompts(n, length):
        return [torch.randint(3, cfg.vocab_size, (length,), generator=g).tolist() for _ in range(n)]

    rows = []
    run_requests(engine, prompts(min(2, max_bs), 8), 4)  # warm-up
    for bs in args.batch_sizes:
        r = run_requests(engine, prompts(bs, args.prompt_len), args.output_len)
        r["batch"] = bs
        if "copy_GBps" in out:
            floor_s = (wbytes + 2 * bs * sbytes) / (out["copy_GBps"] * 1e9)
            r["roofline_tok_s"] = bs / floor_s
            r["roofline_ratio"] = r["decode_tok_s"] / r["roofline_tok_s"]
        rows.append(r)
        log.info("batch %d: %s", bs, r)
    out["decode"] = rows

    if args.prefill_len:
        pre = []
        for n in args.prefill_len:
            engine.scheduler.max_num_batched_tokens = max(n, max_bs)
            run_requests(engine, prompts(1, n), 1)       # warm-up at this shape
            r = run_requests(engine, prompts(1, n), 1)
            row = {"tokens": n, "ttft_s": r["ttft_s"], "prefill_tok_s": n / r["ttft_s"]}
            if "matmul_TFLOPs" in out:
                floor = 2 * cfg.num_params() * n / (out["matmul_TFLOPs"] * 1e12)
                row.update(floor_s=floor, floor_ratio=floor / r["ttft_s"])
            pre.append(row)
        out["prefill"] = pre
        engine.scheduler.max_num_batched_tokens = ec.max_num_batched_tokens

    if args.context_lens:
        ctx = []
        for n in args.context_lens:
            engine.scheduler.max_num_batched_tokens = max(min(n, 16384), max_bs)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            r = run_requests(engine, prompts(args.context_batch, n), args.output_len)
            row = {"context": n, "batch": args.context_batch, "decode_tok_s": r["decode_tok_s"],
                   "ms_per_step": r["step_ms_median"]}
            if device.type == "cuda":
                row["peak_mem_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
            ctx.append(row)
        out["context"] = ctx
        engine.scheduler.max_num_batched_tokens = ec.max_num_batched_tokens
    return out


def add_bench_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, model_help="'random-7b' (random weights with the 7B's shapes), 'demo', a path or a hub id "
                                 "(default: random-7b on a GPU, demo on the CPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, nargs="*", default=[16384], help="single-prompt prefill lengths")
    p.add_argument("--context-lens", type=int, nargs="*", default=[1024, 65536],
                   help="decode speed after prompts this long (constant-time check)")
    p.add_argument("--context-batch", type=int, default=1)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="the prompt-state cache (default on, as tnl serve; random prompts never hit it)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap host work with the next decode step (default: on for CUDA)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_kernel_args(p)


def print_report(out: dict) -> None:
    print(f"device {out['device']}  torch {out['torch']}  kernels {out.get('kernels')}")
    if "copy_GBps" in out:
        print(f"ceilings: copy {out['copy_GBps']:.0f} GB/s, bf16 matmul {out['matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"model: {out['params_B']:.2f} B params, {out['weight_GB']:.2f} GB read per step, "
          f"{out['state_MB_per_seq']:.1f} MB state per sequence ({out.get('state_dtype', 'float32')}), quantization "
          f"{out.get('quantization', 'none')}; load {out['load_s']:.1f} s, "
          f"engine init (graphs) {out['engine_init_s']:.1f} s")
    print(f"{'batch':>6} {'TTFT s':>8} {'decode tok/s':>13} {'roofline':>10} {'ratio':>6}")
    for r in out["decode"]:
        print(f"{r['batch']:>6} {r['ttft_s']:>8.3f} {r['decode_tok_s']:>13.1f} "
              f"{r.get('roofline_tok_s', float('nan')):>10.1f} {r.get('roofline_ratio', float('nan')):>6.2f}")
    for r in out.get("prefill", []):
        print(f"prefill {r['tokens']} tokens: {r['ttft_s']:.3f} s, {r['prefill_tok_s']:.0f} tok/s, "
              f"floor ratio {r.get('floor_ratio', float('nan')):.2f}")
    for r in out.get("context", []):
        print(f"decode after {r['context']}-token prompt (batch {r['batch']}): {r['ms_per_step']:.2f} ms/step, "
              f"{r['decode_tok_s']:.1f} tok/s, peak mem {r.get('peak_mem_GB', float('nan')):.2f} GB")


def main(args) -> int:
    out = bench(args, kernel_config_from_args(args))
    print_report(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
