"""Accuracy of 8-bit weights (--quantization) and a 16-bit state (--state-dtype) against the
float32 engine (fp32 weights, fp32 state).

Demo model, CPU (the numbers in BENCHMARKS.md; 8-10 minutes on one core of a busy CPU, most of
it the 32k tokens decoded one by one):

    python benchmarks/accuracy.py --stochastic-rounding --json accuracy.json

  held-out text: by default README.md and BENCHMARKS.md as of commit aa9d133 (`git show`), cut
  into paragraphs, each laid out as [BOS] paragraph [EOS] like the training rows. The demo model
  was trained on Debian's fortunes only (src/tnl/demo/MODEL_CARD.md), so this text is held out,
  and it is fixed by the commit; it is far from fortunes, so its perplexity is high, but every
  variant scores the same tokens. --text FILE scores a file instead (paragraphs split on blank
  lines, or on RS, 0x1E, as in demo/data/valid.txt, the model card's split: `python
  demo/prepare_data.py` writes it once the fortune packages are installed).

  * teacher-forced: --min-tokens target tokens or more, in rows of --seq-len tokens, scored by
    the engine itself (LLM.generate, SamplingParams(max_tokens=0, prompt_logprobs=0)) with a step
    budget of --step-tokens, so each row is prefilled in several chunks and its state is rounded
    to the state dtype, then read back, at every chunk end (a row done in one chunk would never
    read its rounded state); perplexity and max / mean |Δ logprob| against the float32 engine.
  * greedy: --prompts prompts (the first --prompt-tokens tokens of paragraphs), --new-tokens
    greedy tokens each (ignore_eos) through the same engine; the share of continuations identical
    to the float32 engine's, and the mean share of tokens before the first difference.
  * long: one sequence of --long-len tokens of the text, |Δ logprob| by position bucket against
    the fp32 model scored as prompt chunks of --chunk (LONG_RUNS): each 16-bit state token by
    token through the model's decode step (rounded after every token: what generating that many
    tokens does, the worst case) and as prompt chunks (rounded once per chunk: a long prompt);
    bf16 weights with an fp32 state, the yardstick ("bf16-weight noise"), as prompt chunks and,
    over the first --floor-len tokens, token by token (the same noise); the fp32 model token by
    token over the first --floor-len tokens is the floor (two fp32 summation orders). The demo
    model was trained on 256-token rows: far past that its predictions are poor, but the
    difference between two variants still measures how the state's rounding error grows with
    length. A run whose logits turn inf/NaN stops there and reports the position.
    --stochastic-rounding adds a bfloat16 state written with stochastic rounding, token by token
    (a prototype in this file, StochasticRoundingBackend; tnl itself rounds to nearest).

Random 7B-shaped weights (GPU; --model random-tiny runs the same code on a CPU in seconds):

    python benchmarks/accuracy.py --model random-7b --device cuda --json accuracy_7b.json

  the relative error ||logits - ref|| / ||ref|| (and the share of equal argmax) of int8 / fp8
  weights (fp8 on compute capability 8.9+) and a bf16 state against bf16 weights with a float32
  state, for random prompts (prefill, one chunk per row) and then teacher-forced decode steps.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import torch

from tnl.kernels import torch_ops
from tnl.kernels.backend import Backend
from tnl.model.transnormer import AttnBatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_COMMIT, TEXT_FILES = "aa9d133", ("README.md", "BENCHMARKS.md")
RS = "\x1e"
BUCKETS = [0, 1024, 2048, 4096, 8192, 16384, 32768]   # long-sequence position buckets (then one per 32k)

REF = "fp32 weights, fp32 state"
DEMO_VARIANTS = {  # name -> (weights dtype, quantization, state dtype); REF first
    REF: ("float32", "none", "float32"),
    "bf16 weights, fp32 state": ("bfloat16", "none", "float32"),
    "int8 weights, fp32 state": ("float32", "int8", "float32"),
    "fp32 weights, bf16 state": ("float32", "none", "bfloat16"),
    "fp32 weights, fp16 state": ("float32", "none", "float16"),
    "int8 weights, bf16 state": ("float32", "int8", "bfloat16"),
}
LONG_RUNS = [  # (variant, token by token, only the first --floor-len positions)
    (REF, True, True),                               # the floor: two fp32 summation orders
    ("bf16 weights, fp32 state", False, False),     # the yardstick: bf16-weight noise
    ("bf16 weights, fp32 state", True, True),       # ... the same token by token
    ("fp32 weights, bf16 state", True, False),      # generating: rounded after every token
    ("fp32 weights, fp16 state", True, False),
    ("fp32 weights, bf16 state", False, False),     # a long prompt: rounded once per chunk
    ("fp32 weights, fp16 state", False, False),
]
SR = "fp32 weights, bf16 state, stochastic rounding (prototype)"   # --stochastic-rounding: token by token

RANDOM_TINY = {  # the 7B's structure (LRPE in layer 0, no bias, tied head) at toy size: the CPU check
    "model_type": "transnormer", "vocab_size": 1024, "decoder_embed_dim": 256, "hidden_dim": 256,
    "decoder_layers": 2, "decoder_attention_heads": 4, "glu_dim": 512, "linear_use_lrpe_list": [1, 0],
    "no_scale_embedding": False, "bias": False, "norm_type": "simplermsnorm", "linear_act_fun": "silu",
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


# ---- held-out text -----------------------------------------------------------------------------
def held_out_paragraphs(path: str | None) -> tuple[list[str], str]:
    """(paragraphs, where they come from): --text FILE, else TEXT_FILES at TEXT_COMMIT."""
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        where = path
    else:
        parts = []
        for name in TEXT_FILES:
            proc = subprocess.run(["git", "show", f"{TEXT_COMMIT}:{name}"], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"git show {TEXT_COMMIT}:{name} failed ({proc.stderr.strip()}): the default "
                                 f"held-out text needs the repository's history; pass --text FILE instead")
            parts.append(proc.stdout)
        text = "\n\n".join(parts)
        where = f"{' + '.join(TEXT_FILES)} at {TEXT_COMMIT}"
    paras = [p.strip("\n") for p in text.split(RS if RS in text else "\n\n") if p.strip()]
    return paras, f"{where} (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"


# ---- the demo model (CPU) ----------------------------------------------------------------------
def delta(lp: list[float] | torch.Tensor, ref: list[float] | torch.Tensor) -> dict:
    lp, ref = torch.as_tensor(lp, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    d = (lp - ref).abs()
    return {"tokens": lp.numel(), "ppl": math.exp(-lp.mean().item()), "max_abs_dlogprob": d.max().item(),
            "mean_abs_dlogprob": d.mean().item()}


def engine_runs(args, rows: list[list[int]], prompts: list[list[int]]) -> tuple[dict, dict]:
    """Each variant's engine: teacher-forced logprobs of `rows` and greedy continuations of
    `prompts`, compared with REF's. Returns (teacher_forced, greedy) by variant."""
    from tnl import LLM, SamplingParams
    score = SamplingParams(max_tokens=0, prompt_logprobs=0)
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    tf, gr, ref_lp, ref_toks = {}, {}, None, None
    for name, (dtype, q, sd) in DEMO_VARIANTS.items():
        t0 = time.perf_counter()
        llm = LLM("demo", device=args.device, dtype=dtype, quantization=q, state_dtype=sd,
                  max_num_seqs=max(len(rows), len(prompts)), max_num_batched_tokens=args.step_tokens,
                  enable_prefix_caching=False, progress=False, threads=args.threads)
        lp = [d[t] for row, o in zip(rows, llm.generate(rows, score)) for t, d in zip(row[1:], o.prompt_logprobs[1:])]
        toks = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        del llm
        ref_lp, ref_toks = ref_lp or lp, ref_toks or toks
        tf[name] = delta(lp, ref_lp)
        same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(y)) / len(y)
                for x, y in zip(toks, ref_toks)]   # share of each continuation before its first difference
        gr[name] = {"prompts": len(prompts), "new_tokens": args.new_tokens,
                    "identical": sum(x == y for x, y in zip(toks, ref_toks)) / len(prompts),
                    "mean_share_before_first_difference": sum(same) / len(same)}
        print(f"# {name}: {tf[name]} {gr[name]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return tf, gr


@torch.inference_mode()
def sequence_logits(model, ids: torch.Tensor, state_dtype: torch.dtype, chunk: int | None,
                    on_logits=None) -> None:
    """Rows ids [B, L] through `model` over a fresh state pool in `state_dtype`, from position 0:
    as prompt chunks of `chunk` tokens, or token by token through the decode step (chunk None).
    Calls on_logits(start, logits [B, n, V] float32) for positions start..start+n-1 (each
    predicting the token after it); a True return stops the run."""
    dev = model.head_weight.device
    B, L = ids.shape
    pool = model.new_state_pool(B, dev, state_dtype)
    ids = ids.to(dev)
    for a in range(0, L, chunk or 1):
        n = min(chunk or 1, L - a)
        if chunk is None:
            batch = AttnBatch.build([(i, a) for i in range(B)], [], dev)
        else:
            batch = AttnBatch.build([], [(i, a, n) for i in range(B)], dev)
        logits = model.logits(model(ids[:, a:a + n].reshape(-1), batch, pool)).view(B, n, -1)
        if on_logits(a, logits):
            return


def target_logprobs(model, ids: list[int], state_dtype: torch.dtype, chunk: int | None) -> torch.Tensor:
    """Logprob [len(ids) - 1] float64 of each next token of one sequence; NaN from the first
    position whose logits are not finite (the run stops there)."""
    out = torch.full((len(ids) - 1,), math.nan, dtype=torch.float64)
    t = torch.tensor(ids)

    def take(a, logits):
        lp = torch.log_softmax(logits[0].double(), dim=-1)[:len(ids) - 1 - a]
        lp = lp.gather(-1, t[a + 1:a + 1 + lp.shape[0]].view(-1, 1)).squeeze(-1)
        out[a:a + lp.shape[0]] = lp
        return not torch.isfinite(lp).all().item()

    sequence_logits(model, t[:-1].view(1, -1), state_dtype, chunk, take)
    return out


def by_position(lp: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (lp - ref).abs()
    bad = (~torch.isfinite(lp)).nonzero()
    edges = [b for b in BUCKETS if b < d.numel()] + [d.numel()]
    buckets = []
    for lo, hi in zip(edges, edges[1:]):
        part = d[lo:hi]
        ok = part[torch.isfinite(part)]
        buckets.append({"from": lo, "to": hi, "finite": ok.numel() / part.numel(),
                        "mean_abs_dlogprob": ok.mean().item() if ok.numel() else math.nan,
                        "max_abs_dlogprob": ok.max().item() if ok.numel() else math.nan,
                        "ref_ppl": math.exp(-ref[lo:hi].mean().item())})
    return {"tokens": d.numel(), "first_nonfinite": bad[0].item() if bad.numel() else None, "buckets": buckets}


def long_runs(args, ids: list[int]) -> dict:
    """LONG_RUNS over one sequence, against REF as prompt chunks of --chunk."""
    from tnl.loading import DEMO_MODEL_DIR
    from tnl.model.weights import load_model
    models = {}

    def run(name, chunk, n):
        dtype, q, sd = DEMO_VARIANTS[name] if name != SR else ("float32", "none", "bfloat16")
        if (dtype, q, name == SR) not in models:
            m = load_model(DEMO_MODEL_DIR, device=args.device, dtype=dtype, progress=False, quantization=q)
            if name == SR:
                m.backend = StochasticRoundingBackend()
            models[(dtype, q, name == SR)] = m
        t0 = time.perf_counter()
        lp = target_logprobs(models[(dtype, q, name == SR)], ids[:n + 1], getattr(torch, sd), chunk)
        print(f"# long: {name}, {mode_name(chunk)}, {n} tokens: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return lp

    n_all = len(ids) - 1
    ref = run(REF, args.chunk, n_all)
    out = {}
    for name, token_by_token, short in LONG_RUNS + ([(SR, True, False)] if args.stochastic_rounding else []):
        n = min(args.floor_len, n_all) if short else n_all
        chunk = None if token_by_token else args.chunk
        label = f"{name}, {mode_name(chunk)}" + (f" (first {n})" if n < n_all else "")
        out[label] = by_position(run(name, chunk, n), ref[:n])
    return out


class StochasticRoundingBackend(Backend):
    """The PyTorch backend, but the decode step writes a bfloat16 state with stochastic rounding:
    a prototype measured here only (tnl rounds to nearest). Round to nearest loses a head's decay
    once 1 - decay is below half a bfloat16 step (2^-9; the demo's layers 3 and 4 have such heads):
    decay * S rounds back to S. Rounding up with probability (distance to the value below) / step
    keeps the expected value, so the decay survives on average."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)

    def decode_attention(self, q, k, v, decay, pool, slots, theta=None, positions=None) -> torch.Tensor:
        assert pool.dtype == torch.bfloat16 and not q.is_cuda
        q, k = torch_ops.feature_map(q, theta, positions), torch_ops.feature_map(k, theta, positions)
        S = pool.index_select(0, slots).float()                                    # [B, H, dk, dv]
        S = decay.view(1, -1, 1, 1) * S + k.float().unsqueeze(-1) * v.float().unsqueeze(-2)
        # bfloat16 is float32's top 16 bits: add uniform random low bits, then cut them (exact)
        bits = S.contiguous().view(torch.int32)
        bits = (bits + torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=self.gen)) & ~0xFFFF
        pool.index_copy_(0, slots, bits.view(torch.float32).to(torch.bfloat16))
        return (q.float().unsqueeze(-2) @ S).squeeze(-2).to(v.dtype)


def mode_name(chunk: int | None) -> str:
    return "token by token" if chunk is None else f"chunks of {chunk}"


def demo(args) -> dict:
    from tnl.loading import DEMO_MODEL_DIR
    from tnl.model.tokenizer import Tokenizer
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_dir(DEMO_MODEL_DIR)
    paras, source = held_out_paragraphs(args.text)
    docs = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) + [tok.eos_token_id] for p in paras]
    stream = [t for d in docs for t in d]
    n_rows = -(-args.min_tokens // (args.seq_len - 1))
    need = max(n_rows * args.seq_len, args.long_len + 1)
    if len(stream) < need:
        raise SystemExit(f"the held-out text has {len(stream)} tokens; this run needs {need} "
                         f"(--min-tokens, --seq-len, --long-len)")
    rows = [stream[i * args.seq_len:(i + 1) * args.seq_len] for i in range(n_rows)]
    prompts = [d[:args.prompt_tokens] for d in docs if len(d) > args.prompt_tokens]
    if len(prompts) < args.prompts:
        raise SystemExit(f"{len(prompts)} paragraphs of more than {args.prompt_tokens} tokens; "
                         f"--prompts {args.prompts}")
    tf, gr = engine_runs(args, rows, prompts[:args.prompts])
    return {"text": source, "paragraphs": len(paras), "text_tokens": len(stream), "seq_len": args.seq_len,
            "teacher_forced": tf, "greedy": gr, "long_chunk": args.chunk,
            "long": long_runs(args, stream[:args.long_len + 1])}


# ---- random weights (7B shapes on a GPU) ---------------------------------------------------------
@torch.inference_mode()
def random_weights(args) -> dict:
    from tnl.kernels.quant import FP8_MIN_CAPABILITY
    from tnl.model.weights import RANDOM_7B, random_model
    dev = torch.device(args.device)
    cfg = RANDOM_7B if args.model == "random-7b" else RANDOM_TINY
    if args.model == "random-7b" and dev.type != "cuda":
        raise SystemExit("--model random-7b needs --device cuda (--model random-tiny runs the same code on a CPU)")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    P, D = args.rand_prompt, args.rand_decode
    ids = torch.randint(3, cfg["vocab_size"], (args.rand_batch, P + D), generator=g)
    variants = [  # (name, quantization or "fp32": the same bf16 values computed in float32, state dtype); ref first
        ("bf16 weights, fp32 state", "none", "float32"), ("bf16 weights, bf16 state", "none", "bfloat16"),
        ("bf16 weights computed in fp32, fp32 state", "fp32", "float32"),   # the yardstick: bf16 compute noise
        ("int8 weights, fp32 state", "int8", "float32"), ("int8 weights, bf16 state", "int8", "bfloat16")]
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= FP8_MIN_CAPABILITY:
        variants += [("fp8 weights, fp32 state", "fp8", "float32"), ("fp8 weights, bf16 state", "fp8", "bfloat16")]
    out = {"model": args.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "batch": args.rand_batch, "prompt": P, "decode_steps": D, "variants": {}}
    ref = model = None
    for name, q, sd in variants:
        if model is None or built != q:
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            # quantized from the bf16 weights; "fp32": those bf16 values, upcast (the same weights)
            model = random_model(cfg, dev, torch.bfloat16, quantization="none" if q == "fp32" else q)
            if q == "fp32":
                model = model.float()
            built = q
        t0 = time.perf_counter()
        B = len(ids)
        pool = model.new_state_pool(B, dev, getattr(torch, sd))
        x = ids.to(dev)
        pre = model.logits(model(x[:, :P].reshape(-1), AttnBatch.build([], [(i, 0, P) for i in range(B)], dev), pool))
        pre = pre.view(B, P, -1)                                                              # [B, P, V]
        dec = torch.stack([model.logits(model(x[:, t], AttnBatch.build([(i, t) for i in range(B)], [], dev), pool))
                           for t in range(P, P + D)], dim=1)                                  # [B, D, V]
        ref = ref or (pre, dec)
        out["variants"][name] = {
            "prefill_rel_err": rel_err(pre, ref[0]), "decode_rel_err": rel_err(dec, ref[1]),
            "decode_rel_err_last_step": rel_err(dec[:, -1], ref[1][:, -1]),
            "prefill_argmax_equal": (pre.argmax(-1) == ref[0].argmax(-1)).double().mean().item(),
            "decode_argmax_equal": (dec.argmax(-1) == ref[1].argmax(-1)).double().mean().item(),
            "seconds": round(time.perf_counter() - t0, 1)}
        print(f"# {name}: {out['variants'][name]}", file=sys.stderr)
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


# ---- report ----------------------------------------------------------------------------------------
def markdown(out: dict) -> str:
    e = lambda x: "NaN" if math.isnan(x) else f"{x:.1e}"  # noqa: E731
    lines = []
    if "teacher_forced" in out:
        n = out["teacher_forced"][REF]["tokens"]
        g = out["greedy"][REF]
        lines += [f"Teacher-forced: {n} target tokens of {out['text']}, rows of {out['seq_len']} tokens, through the "
                  f"engine (prompt_logprobs); greedy: {g['prompts']} prompts x {g['new_tokens']} tokens. |Δ logprob| "
                  f"against {REF}.", "",
                  "| variant | perplexity | max abs Δ logprob | mean abs Δ logprob | greedy identical | "
                  "tokens before first difference |", "|---|---|---|---|---|---|"]
        for name, t in out["teacher_forced"].items():
            g = out["greedy"][name]
            lines.append(f"| {name} | {t['ppl']:.2f} | {e(t['max_abs_dlogprob'])} | {e(t['mean_abs_dlogprob'])} | "
                         f"{g['identical']:.0%} | {g['mean_share_before_first_difference']:.0%} |")
        first = next(iter(out["long"].values()))["tokens"]
        edges = next(v["buckets"] for v in out["long"].values() if v["tokens"] > first)   # a full-length run's
        lines += ["", f"One sequence of {edges[-1]['to']} tokens: mean (max) abs Δ logprob by position against "
                      f"{REF} in prompt chunks of {out['long_chunk']}.", "",
                  "| run | " + " | ".join(f"{b['from']}-{b['to']}" for b in edges) + " |",
                  "|---" * (len(edges) + 1) + "|",
                  "| (reference's perplexity) | " + " | ".join(f"{b['ref_ppl']:.0f}" for b in edges) + " |"]
        for k, v in out["long"].items():
            cells = [f"{e(b['mean_abs_dlogprob'])} ({e(b['max_abs_dlogprob'])})"
                     + (f"; inf/NaN from {v['first_nonfinite']}" if b["finite"] < 1 else "") for b in v["buckets"]]
            lines.append(f"| {k} | " + " | ".join(cells + [""] * (len(edges) - len(cells))) + " |")
    if "variants" in out:
        lines += [f"{out['model']} on {out['device']}: {out['batch']} random prompts of {out['prompt']} tokens, then "
                  f"{out['decode_steps']} decode steps; logits against bf16 weights + fp32 state.", "",
                  "| variant | prefill rel err | decode rel err | last step rel err | "
                  "argmax equal (prefill / decode) |",
                  "|---|---|---|---|---|"]
        for k, v in out["variants"].items():
            lines.append(f"| {k} | {e(v['prefill_rel_err'])} | {e(v['decode_rel_err'])} | "
                         f"{e(v['decode_rel_err_last_step'])} | {v['prefill_argmax_equal']:.1%} / "
                         f"{v['decode_argmax_equal']:.1%} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", choices=["demo", "random-7b", "random-tiny"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the demo model gains nothing from more)")
    p.add_argument("--text", default=None, help="a held-out text file instead of the default (see above)")
    p.add_argument("--seq-len", type=int, default=512, help="teacher-forced row length")
    p.add_argument("--min-tokens", type=int, default=20000, help="teacher-forced target tokens, at least")
    p.add_argument("--step-tokens", type=int, default=128,
                   help="the engine's token budget per step: rows are prefilled in chunks of at most this")
    p.add_argument("--prompts", type=int, default=128, help="greedy prompts")
    p.add_argument("--prompt-tokens", type=int, default=16,
                   help="tokens of a paragraph that make a prompt (BOS included)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--long-len", type=int, default=32768, help="long-sequence positions")
    p.add_argument("--floor-len", type=int, default=2048, help="fp32 token-by-token positions (the floor)")
    p.add_argument("--stochastic-rounding", action="store_true",
                   help="also the long sequence with a bfloat16 state stochastically rounded (a prototype; CPU)")
    p.add_argument("--chunk", type=int, default=2048, help="prompt chunk of the long sequence's reference")
    p.add_argument("--rand-batch", type=int, default=4)
    p.add_argument("--rand-prompt", type=int, default=1024)
    p.add_argument("--rand-decode", type=int, default=32)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    t0 = time.perf_counter()
    out = demo(args) if args.model == "demo" else random_weights(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    out.update(date=time.strftime("%Y-%m-%d", time.gmtime()), commit=commit.strip(), torch=torch.__version__,
               command=" ".join(["python", "benchmarks/accuracy.py"] + sys.argv[1:]),
               seconds=round(time.perf_counter() - t0))
    print(markdown(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
