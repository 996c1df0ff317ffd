"""Multi-turn chat against a running `tnl serve`, the way chat clients talk: every turn re-sends
the whole conversation. Measures what the prompt-state cache is for.

    python benchmarks/multiturn.py --url http://127.0.0.1:6006 --conversations 32 --turns 8 \
        --system-len 4096 --turn-len 200 --output-len 200

Each conversation: a system prompt (the same for all, random token ids) and `turns` turns of
`turn-len` new user tokens and `output-len` generated tokens (ignore_eos), sent to
/v1/completions as token ids with streaming. Turn k's prompt is turn k-1's prompt + its
generated ids (read from the stream's logprob tokens, "token_id:N" for a checkpoint without a
tokenizer such as random-7b, the model this is for) + the new user ids.
Conversations run concurrently; within one, turns are sequential.

Prints TTFT p50/p99 over all turns and per turn, the prompt tokens sent and computed (the
engine's prefill counter), and the server's cache counters (GET /metrics) over the run. Run it
once against `tnl serve` and once against `tnl serve --no-enable-prefix-caching`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx

COUNTERS = ("tnl_engine_prefill_tokens_total", "tnl_prefix_cache_queries_total", "tnl_prefix_cache_hits_total",
            "tnl_prefix_cache_query_tokens_total", "tnl_prefix_cache_hit_tokens_total")


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in COUNTERS:
            out[name] = float(value)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def conversation(client: httpx.AsyncClient, url: str, model: str, system: list[int], args, rng: random.Random,
                       ttft: list[list[float]], cached: list[list[int]]) -> None:
    prompt = list(system)
    for turn in range(args.turns):
        prompt += [rng.randrange(3, args.vocab) for _ in range(args.turn_len)]
        body = {"model": model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}
        t0 = time.perf_counter()
        first, out_ids = None, []
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and first is None:
                    first = time.perf_counter() - t0
                for c in chunk["choices"]:   # the generated ids, re-sent next turn as a chat client would
                    out_ids += [int(t.removeprefix("token_id:")) for t in (c.get("logprobs") or {}).get("tokens", [])]
                if chunk.get("usage"):
                    cached[turn].append(chunk["usage"]["prompt_tokens_details"]["cached_tokens"])
        ttft[turn].append(first)
        prompt += out_ids


async def main_async(args) -> dict:
    rng = random.Random(args.seed)
    system = [rng.randrange(3, args.vocab) for _ in range(args.system_len)]
    model = httpx.get(args.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    ttft = [[] for _ in range(args.turns)]
    cached = [[] for _ in range(args.turns)]
    before = scrape(args.url)
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=args.conversations * 2)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await asyncio.gather(*(conversation(client, args.url, model, system, args, random.Random(args.seed + 1 + i),
                                            ttft, cached) for i in range(args.conversations)))
    wall = time.perf_counter() - t0
    after = scrape(args.url)
    d = {k.removeprefix("tnl_").removesuffix("_total"): after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
    every = [x for t in ttft for x in t]
    sent = sum(args.conversations * (args.system_len + (k + 1) * args.turn_len + k * args.output_len)
               for k in range(args.turns))
    return {"conversations": args.conversations, "turns": args.turns, "wall_s": wall,
            "ttft_p50_s": pct(every, 50), "ttft_p99_s": pct(every, 99),
            "ttft_p50_by_turn_s": [pct(t, 50) for t in ttft],
            "cached_tokens_by_turn_mean": [sum(c) / max(1, len(c)) for c in cached],
            "prompt_tokens_sent": sent,
            "engine_prefill_tokens": d["engine_prefill_tokens"],
            "cache_queries": d["prefix_cache_queries"], "cache_hits": d["prefix_cache_hits"],
            "cache_hit_rate": d["prefix_cache_hits"] / d["prefix_cache_queries"] if d["prefix_cache_queries"] else 0.0,
            "cache_hit_tokens": d["prefix_cache_hit_tokens"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:6006")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-len", type=int, default=4096)
    p.add_argument("--turn-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--vocab", type=int, default=6000, help="token ids are drawn from [3, vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    res = asyncio.run(main_async(args))
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
