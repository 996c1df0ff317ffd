"""HTTP load against a running `tnl serve`: N concurrent streaming clients on /v1/completions.

    python benchmarks/serve_load.py --url http://127.0.0.1:6006 --concurrency 64 --requests 256 \
        --prompt-len 128 --output-len 128

Prompts are random token ids (works for checkpoints without a tokenizer). Prints aggregate
output tok/s, TTFT and inter-token latency percentiles; --json writes them. It also reads the
server's engine counters from GET /metrics before and after the run and prints where the
server's time went: the batch the engine ran (decode rows per decode-carrying step), the share of
the wall clock the device was busy (CUDA) and the share the engine sat idle waiting for requests.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

ENGINE_COUNTERS = ("tnl_engine_steps_total", "tnl_engine_prefill_steps_total", "tnl_engine_prefill_tokens_total",
                   "tnl_engine_decode_tokens_total", "tnl_engine_device_busy_seconds_total",
                   "tnl_engine_prefill_step_device_seconds_total", "tnl_engine_idle_seconds_total")


def engine_counters(url: str, key: str | None) -> dict[str, float]:
    """The engine's cumulative counters from /metrics ({} when the server has none)."""
    try:
        r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else None, timeout=10)
    except httpx.HTTPError:
        return {}
    values = {}
    for line in r.text.splitlines():
        name, _, value = line.partition(" ")
        if name in ENGINE_COUNTERS:
            values[name] = float(value)
    return values


def server_view(before: dict[str, float], after: dict[str, float], wall: float, span: float) -> dict[str, float]:
    """Engine counters over the run. wall: the clients' first send to last byte; span: the
    scrapes' window around it (process start-up included), which only the idle time sees."""
    if not before or set(before) != set(after):
        return {}
    d = {k.removeprefix("tnl_engine_").removesuffix("_total"): after[k] - before[k] for k in after}
    return {"server_steps": d["steps"], "server_prefill_steps": d["prefill_steps"],
            "server_rows_per_step": d["decode_tokens"] / max(d["steps"], 1),
            "server_device_busy": d["device_busy_seconds"] / wall,
            "server_prefill_step_device_s": d["prefill_step_device_seconds"],
            "server_idle": max(0.0, d["idle_seconds"] - (span - wall)) / wall}


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


async def _clients(a, seed: int, start_at: float) -> tuple[list, int, float, float]:
    """One process's share: a.concurrency clients for a.requests requests, from start_at (a
    time.time() shared by all processes). Returns the per-request stamps, chunks, start, end."""
    rng = random.Random(seed)
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

        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.time()
        await asyncio.gather(*(task() for _ in range(a.requests)))
        return results, chunks[0], t0, time.time()


def _process_share(a, seed: int, start_at: float):
    return asyncio.run(_clients(a, seed, start_at))


def run(a) -> dict:
    """--processes N: the clients split over N processes (the concurrency and requests divided
    among them), so that one Python process parsing the streams is not what limits the rate."""
    start_at = time.time() + (2.0 if a.processes > 1 else 0.0)
    shares = []
    for i in range(a.processes):
        sub = argparse.Namespace(**vars(a))
        sub.concurrency = a.concurrency // a.processes + (i < a.concurrency % a.processes)
        sub.requests = a.requests // a.processes + (i < a.requests % a.processes)
        shares.append((sub, i, start_at))
    before = engine_counters(a.url, a.api_key)
    t0 = time.perf_counter()
    if a.processes == 1:
        parts = [_process_share(*shares[0])]
    else:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(a.processes) as pool:
            parts = pool.starmap(_process_share, shares)
    span = time.perf_counter() - t0
    after = engine_counters(a.url, a.api_key)
    results = [r for part in parts for r in part[0]]
    n_chunks = sum(part[1] for part in parts)
    wall = max(part[3] for part in parts) - min(part[2] for part in parts)
    # stamps are perf_counter() values of each process: only differences within one request are used
    ttft = [s[0] - t for t, s in results if s]
    itl = [b - a_ for _, s in results for a_, b in zip(s, s[1:])]
    tokens = sum(len(s) for _, s in results)
    out = {"requests": a.requests, "concurrency": a.concurrency, "processes": a.processes,
           "prompt_len": a.prompt_len, "output_len": a.output_len, "wall_s": wall, "output_tokens": tokens,
           "output_tok_s": tokens / wall, "chunks": n_chunks, "tokens_per_chunk": tokens / max(n_chunks, 1),
           "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_ms": 1e3 * pct(itl, 50),
           "itl_p99_ms": 1e3 * pct(itl, 99), "itl_mean_ms": 1e3 * statistics.fmean(itl) if itl else float("nan")}
    out.update(server_view(before, after, wall, span))
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
    p.add_argument("--processes", type=int, default=1,
                   help="split the clients over this many processes (see whether the client limits the rate)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not 1 <= a.processes <= a.concurrency:
        p.error("--processes must be between 1 and --concurrency")
    out = run(a)
    for k, v in out.items():
        print(f"{k:>16}: {v:.4g}" if isinstance(v, float) else f"{k:>16}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
