"""HTTP load against a running `tnl serve`: N concurrent streaming clients on /v1/completions.

    python benchmarks/serve_load.py --url http://127.0.0.1:6006 --concurrency 64 --requests 256 \
        --prompt-len 128 --output-len 128

Prompts are random token ids (works for checkpoints without a tokenizer). Prints aggregate
output tok/s, TTFT and inter-token latency percentiles; --json writes them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], out_len: int, key: str | None,
              logprobs: bool, chunks: list[int]):
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "stream": True,
            "ignore_eos": True}
    if logprobs:  # a checkpoint without a tokenizer streams no text: the logprob of each token marks it
        body["logprobs"] = 0
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                # a chunk may carry several tokens (the server merges deltas a slow reader
                # let pile up); with logprobs each token has an entry, else count the chunk
                lp = choice.get("logprobs")
                n = len(lp["token_logprobs"]) if lp else 1
                now = time.perf_counter()
                stamps.extend([now] * n)
                chunks[0] += 1
    return t0, stamps


async def run(a) -> dict:
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=a.concurrency + 8)) as client:
        models = (await client.get(a.url + "/v1/models")).json()["data"]
        model = models[0]["id"]
        sem = asyncio.Semaphore(a.concurrency)
        results = []
        chunks = [0]

        async def task():
            prompt = [rng.randrange(3, a.vocab) for _ in range(a.prompt_len)]
            async with sem:
                results.append(await one(client, a.url, model, prompt, a.output_len, a.api_key, a.logprobs,
                                         chunks))

        t0 = time.perf_counter()
        await asyncio.gather(*(task() for _ in range(a.requests)))
        wall = time.perf_counter() - t0
    ttft = [s[0] - t for t, s in results if s]
    itl = [b - a_ for _, s in results for a_, b in zip(s, s[1:])]
    tokens = sum(len(s) for _, s in results)
    out = {"requests": a.requests, "concurrency": a.concurrency, "prompt_len": a.prompt_len,
           "output_len": a.output_len, "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
           "chunks": chunks[0], "tokens_per_chunk": tokens / max(chunks[0], 1),
           "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_ms": 1e3 * pct(itl, 50),
           "itl_p99_ms": 1e3 * pct(itl, 99), "itl_mean_ms": 1e3 * statistics.fmean(itl) if itl else float("nan")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:6006")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=64000, help="random prompt ids are drawn below this")
    p.add_argument("--api-key", default=None)
    p.add_argument("--logprobs", action="store_true",
                   help="ask for each token's logprob (needed to see tokens stream from a tokenizer-less model)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = asyncio.run(run(a))
    for k, v in out.items():
        print(f"{k:>16}: {v:.4g}" if isinstance(v, float) else f"{k:>16}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
