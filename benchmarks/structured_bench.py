"""Structured output's cost: decode tok/s with every row JSON-Schema constrained against the same
batch unconstrained, in one process on one engine, and the compile time of a mid-size schema.

    python benchmarks/structured_bench.py                      # random-7b on a GPU (the 7B's shapes)
    python benchmarks/structured_bench.py --model demo --output-len 32    # a quick check on a CPU

random-7b has no tokenizer, so the engine gets the demo model's (6,144 pieces): xgrammar's
vocabulary table is padded to the 7B's 64,000 ids (ids past the pieces are never allowed, and
the engine never samples them either way), so the masks have the 7B's width on the GPU, but
the host fills them over 6,144 pieces. A real 64k vocabulary costs the host more per mask, so
the script also times the compile and the batched mask fill over a synthetic 64,000-piece
vocabulary (the demo's pieces and concatenations of two of them), without the model.

Decode rows: greedy over random prompt ids, `--output-len` tokens each. Unconstrained rows use
ignore_eos; constrained rows follow DECODE_SCHEMA, an array of records with minItems 10**5,
which cannot end within --output-len tokens, so both runs decode the same number of tokens.
Each pair runs --repeats times, alternating, and the best of each is kept. Prints one JSON
line (and writes it to --json).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time

import torch

from tnl.config import engine_config
from tnl.engine import LLMEngine, SamplingParams, StructuredOutputs
from tnl.loading import RANDOM_MODEL, resolve_model_dir, set_cpu_threads
from tnl.model.tokenizer import Tokenizer
from tnl.model.weights import RANDOM_7B, load_model, random_model, resolve_device, resolve_dtype

log = logging.getLogger("structured_bench")

RECORD = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 16},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "score": {"type": "number"}, "ok": {"type": "boolean"}}, "required": ["id", "name", "tags", "score", "ok"]}
DECODE_SCHEMA = {"type": "array", "minItems": 100_000, "items": RECORD}

# A mid-size schema: an order with nested objects, $defs, enums, bounds, patterns, optional fields
# (~40 properties in all), the kind of schema an API client sends.
ADDRESS = {"type": "object", "properties": {
    "street": {"type": "string", "maxLength": 64}, "city": {"type": "string", "maxLength": 32},
    "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"}, "country": {"enum": ["US", "CA", "MX", "DE", "CN"]},
    "lines": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3}},
    "required": ["street", "city", "zip", "country"], "additionalProperties": False}
MID_SCHEMA = {
    "$defs": {"address": ADDRESS, "money": {"type": "object", "properties": {
        "amount": {"type": "number", "minimum": 0, "maximum": 1e6}, "currency": {"enum": ["USD", "EUR", "CNY"]}},
        "required": ["amount", "currency"], "additionalProperties": False}},
    "type": "object", "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[A-Z0-9]{8}$"},
        "created": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"},
        "status": {"enum": ["new", "paid", "shipped", "delivered", "cancelled", "refunded"]},
        "customer": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1}, "name": {"type": "string", "maxLength": 80},
            "email": {"type": "string", "pattern": "^[a-z0-9._%+-]+@[a-z0-9.-]+\\.[a-z]{2,}$"},
            "phone": {"type": ["string", "null"], "pattern": "^\\+?[0-9 -]{7,15}$"},
            "vip": {"type": "boolean"}, "billing": {"$ref": "#/$defs/address"},
            "shipping": {"$ref": "#/$defs/address"}}, "required": ["id", "name", "email", "billing"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 50, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "title": {"type": "string", "maxLength": 120},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 999}, "price": {"$ref": "#/$defs/money"},
            "options": {"type": "object", "properties": {"size": {"enum": ["XS", "S", "M", "L", "XL"]},
                                                         "color": {"type": "string", "maxLength": 20}}},
            "gift": {"type": "boolean"}}, "required": ["sku", "title", "quantity", "price"]}},
        "total": {"$ref": "#/$defs/money"}, "discount_codes": {"type": "array", "items": {
            "type": "string", "pattern": "^[A-Z0-9]{4,12}$"}, "maxItems": 5},
        "notes": {"type": "string", "maxLength": 500},
        "payment": {"anyOf": [
            {"type": "object", "properties": {"method": {"const": "card"}, "last4": {"type": "string",
                                                                                    "pattern": "^[0-9]{4}$"}},
             "required": ["method", "last4"]},
            {"type": "object", "properties": {"method": {"const": "invoice"}, "due_days": {
                "type": "integer", "minimum": 0, "maximum": 90}}, "required": ["method"]}]}},
    "required": ["order_id", "created", "status", "customer", "items", "total"]}


def build(model: str, device: torch.device, dtype: str, max_num_seqs: int, async_scheduling: bool | None):
    """The engine over `model` (random-7b: random weights, the demo's tokenizer) and its tokenizer."""
    demo = resolve_model_dir("demo")
    if model == RANDOM_MODEL:
        m = random_model(RANDOM_7B, device, resolve_dtype(dtype, device))
        tok = Tokenizer.from_dir(demo, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        path = resolve_model_dir(model)
        m = load_model(path, device=str(device), dtype=dtype, progress=False)
        tok = Tokenizer.from_dir(path, bos_token_id=m.config.bos_token_id, eos_token_id=m.config.eos_token_id,
                                 pad_token_id=m.config.pad_token_id)
    if device.type == "cpu":
        set_cpu_threads(m.config, None)
    ec = engine_config(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_num_seqs),
                       max_waiting=1 << 20, async_scheduling=async_scheduling, enable_prefix_caching=False)
    return LLMEngine(m, tok, ec), tok


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_run(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """The batch to its end: decode tok/s after every row has its first token."""
    eng.prepare([params])
    sync(eng.device)
    reqs = [eng.add_request(p, params) for p in prompts]
    while any(not r.output_token_ids for r in reqs):
        eng.step()
    sync(eng.device)
    t1 = time.perf_counter()
    steps = 0
    while eng.has_work:
        eng.step()
        steps += 1
    sync(eng.device)
    dt = time.perf_counter() - t1
    lengths = [len(r.output_token_ids) for r in reqs]
    reasons = {r.finish_reason for r in reqs}
    for r in reqs:
        eng.release(r.request_id)
    decoded = sum(n - 1 for n in lengths)
    return {"decode_tok_s": decoded / dt, "step_ms": 1e3 * dt / max(steps, 1), "tokens": decoded,
            "finish": sorted(reasons)}


def synthetic_vocab(tok: Tokenizer, size: int, seed: int = 0) -> list[bytes]:
    """`size` distinct pieces: the tokenizer's, then concatenations of two of its ordinary ones."""
    base = [b"" if i in tok.special_token_ids else bytes(tok.token_bytes(i)) for i in range(tok.vocab_size)]
    words = [b for b in base if len(b) > 1]
    seen, out, rng = set(base), list(base), random.Random(seed)
    while len(out) < size:
        piece = rng.choice(words) + rng.choice(words)
        if piece not in seen:
            seen.add(piece)
            out.append(piece)
    return out


def mask_fill(vocab: list[bytes], eos: int, schema: dict, batch_sizes: list[int], walk: int = 40) -> dict:
    """Compile time and batched mask fill (ms) over `vocab`, matchers walked `walk` random allowed
    tokens into the schema (each row at another place in it)."""
    import xgrammar as xgr
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=False)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(schema), max_whitespace_cnt=20)
    compile_s = time.perf_counter() - t0
    out = {"vocab": len(vocab), "tokenizer_info_s": setup, "compile_s": compile_s}
    rng = random.Random(1)
    bits = torch.arange(32, dtype=torch.int32)
    for bs in batch_sizes:
        matchers = [xgr.GrammarMatcher(grammar) for _ in range(bs)]
        mask = xgr.allocate_token_bitmask(bs, len(vocab))
        walked = 0
        for i, m in enumerate(matchers):   # each row its own way in
            for _ in range(rng.randrange(walk)):
                m.fill_next_token_bitmask(mask, i)
                allowed = ((mask[i].view(-1, 1) >> bits) & 1).flatten()[:len(vocab)].nonzero().flatten().tolist()
                allowed = [t for t in allowed if t != eos]
                if not allowed or not m.accept_token(rng.choice(allowed)):
                    break
                walked += 1
        out[f"walked_tokens_b{bs}"] = walked
        batch = xgr.BatchGrammarMatcher()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            if bs == 1:
                matchers[0].fill_next_token_bitmask(mask, 0)
            else:
                batch.batch_fill_next_token_bitmask(matchers, mask)
            times.append(time.perf_counter() - t0)
        out[f"mask_fill_ms_b{bs}"] = 1e3 * sorted(times)[len(times) // 2]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="random-7b (default on a GPU), demo (default on a CPU), a path")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-async-scheduling", action="store_true", help="(async scheduling is CUDA's default)")
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic 64k-vocabulary timings")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = resolve_device(a.device)
    model = a.model or (RANDOM_MODEL if device.type == "cuda" else "demo")
    out: dict = {"model": model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "date": time.strftime("%Y-%m-%d"), "output_len": a.output_len, "prompt_len": a.prompt_len}
    eng, tok = build(model, device, a.dtype, max(a.batch_sizes), False if a.no_async_scheduling else None)
    out.update(vocab_size=eng.model_config.vocab_size, tokenizer_pieces=tok.vocab_size,
               async_scheduling=eng.core.async_scheduling)

    # compile: the first one builds xgrammar's vocabulary table; then the mid-size schema, cold and cached
    mgr = eng.structured
    t0 = time.perf_counter()
    mgr.compile(StructuredOutputs(json={"type": "integer"}))
    out["first_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mgr.compile(StructuredOutputs(json=MID_SCHEMA))
    out["mid_schema_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mgr.compile(StructuredOutputs(json=MID_SCHEMA))
    out["mid_schema_cached_s"] = time.perf_counter() - t0
    out["mid_schema_chars"] = len(json.dumps(MID_SCHEMA))

    g = torch.Generator().manual_seed(0)
    plain = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=a.output_len, temperature=0,
                                 structured_outputs=StructuredOutputs(json=DECODE_SCHEMA))
    decode_run(eng, [[5, 6, 7]], constrained)   # warm-up: the masks' buffers (and on CUDA the mask kernel's JIT)
    rows = []
    for bs in a.batch_sizes:
        prompts = [torch.randint(3, tok.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(bs)]
        best: dict[str, dict] = {}
        for _ in range(a.repeats):
            for name, params in (("unconstrained", plain), ("constrained", constrained)):
                r = decode_run(eng, prompts, params)
                if name not in best or r["decode_tok_s"] > best[name]["decode_tok_s"]:
                    best[name] = r
        u, c = best["unconstrained"], best["constrained"]
        rows.append({"batch": bs, "unconstrained_tok_s": u["decode_tok_s"], "constrained_tok_s": c["decode_tok_s"],
                     "unconstrained_step_ms": u["step_ms"], "constrained_step_ms": c["step_ms"],
                     "slowdown": 1 - c["decode_tok_s"] / u["decode_tok_s"], "tokens": [u["tokens"], c["tokens"]],
                     "finish": c["finish"]})
        log.info("batch %d: %.1f tok/s unconstrained, %.1f constrained (%.1f%% slower)", bs, u["decode_tok_s"],
                 c["decode_tok_s"], 100 * rows[-1]["slowdown"])
    out["decode"] = rows
    if not a.no_synthetic:
        out["synthetic_64k"] = mask_fill(synthetic_vocab(tok, 64000), tok.eos_token_id, MID_SCHEMA, a.batch_sizes)
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
