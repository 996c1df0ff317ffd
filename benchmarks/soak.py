"""A soak run against a running `tnl serve`: N clients for D seconds of mixed traffic, then the
server is checked for what a long run leaves behind.

    python benchmarks/soak.py --url http://127.0.0.1:6006 --clients 256 --duration 120

Each client loops until the time is up (--warmup, then --duration): /v1/completions or
/v1/chat/completions, streamed or not, a few with n = 2, and a share of the streams dropped after
their first events (the client disconnects mid-stream). Then it waits for the server to drain
and prints: requests by outcome, 5xx answers and error events inside streams, streams read to
the end and how many of them ended with `data: [DONE]`, the latency of the answers read whole
(p50 / p99), how long the state slots took to return to 0 (GET /metrics), and the server's RSS
after the warm-up, at most, and at the end, beside what the prompt-state cache holds (--pid,
else the process listening on the URL's port; needs psutil). --json writes the figures
(tests/test_soak.py runs this file and asserts on them).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx

WORDS = ("hello", "world", "state", "space", "model", "linear", "attention", "token", "stream", "slot",
         "你好", "今天", "天气", "模型")
GAUGES = ("tnl_state_slots_used", "tnl_num_requests_running", "tnl_num_requests_waiting")
CACHE_BYTES = "tnl_prefix_cache_bytes"   # what the prompt-state cache holds, by design (bounded)


@dataclass
class Figures:
    clients: int
    duration_s: float
    warmup_s: float                # load before rss_start is read (allocator and caches settle)
    requests: int = 0              # answers received (any status), dropped streams included
    by_status: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0         # 5xx answers
    stream_error_events: int = 0   # data: {"error": ...} inside a 200 stream
    streams_read_to_end: int = 0
    streams_ended_done: int = 0    # of those, the ones whose last event was data: [DONE]
    streams_dropped: int = 0       # the client disconnected mid-stream
    client_errors: int = 0         # the connection failed (no HTTP answer)
    latency_p50_s: float = float("nan")   # answers read whole, send to last byte
    latency_p99_s: float = float("nan")
    drain_s: float = float("nan")  # after the last answer, until the gauges read 0
    gauges_after: dict[str, float] = field(default_factory=dict)
    rss_start_mb: float = float("nan")
    rss_max_mb: float = float("nan")
    rss_end_mb: float = float("nan")
    cache_start_mb: float = float("nan")  # the prompt-state cache's bytes (GET /metrics), part of the RSS
    cache_end_mb: float = float("nan")
    examples: list[str] = field(default_factory=list)   # the first few odd answers, for the report


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def server_process(url: str, pid: int | None):
    """The server's psutil.Process: `pid`, or the one listening on the URL's port."""
    import psutil

    if pid is not None:
        return psutil.Process(pid)
    port = urlsplit(url).port or 80
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    raise SystemExit(f"no process listens on port {port}: pass --pid")


def rss_mb(proc) -> float:
    return proc.memory_info().rss / 2 ** 20


async def gauges(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    text = (await client.get(url + "/metrics")).text
    return {name: float(m.group(1)) for name in (*GAUGES, CACHE_BYTES)
            if (m := re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)) is not None}


class Soak:
    def __init__(self, url: str, clients: int, duration_s: float, warmup_s: float, drop_share: float, seed: int):
        self.url = url
        self.fig = Figures(clients=clients, duration_s=duration_s, warmup_s=warmup_s)
        self.drop_share = drop_share
        self.seed = seed
        self.latencies: list[float] = []
        self.deadline = 0.0

    def odd(self, what: str) -> None:
        if len(self.fig.examples) < 5:
            self.fig.examples.append(what[:300])

    def request(self, rng: random.Random, model: str) -> tuple[str, dict]:
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        body = {"model": model, "max_tokens": rng.randint(1, 24), "temperature": rng.choice((0.0, 0.8)),
                "stream": rng.random() < 0.6, "n": 2 if rng.random() < 0.1 else 1}
        if rng.random() < 0.5:
            return "/v1/completions", {**body, "prompt": prompt}
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}

    async def answered(self, status: int, body: bytes = b"", retry_after: str | None = None) -> None:
        """Counts an answer; after a 429 the client waits as told (Retry-After), as a real one does."""
        self.fig.requests += 1
        self.fig.by_status[str(status)] = self.fig.by_status.get(str(status), 0) + 1
        if status >= 500:
            self.fig.server_errors += 1
            self.odd(f"{status}: {body[:200]!r}")
        if status == 429:
            await asyncio.sleep(min(float(retry_after or 1), 5.0))

    async def one(self, client: httpx.AsyncClient, rng: random.Random, model: str) -> None:
        path, body = self.request(rng, model)
        t0 = time.monotonic()
        if not body["stream"]:
            r = await client.post(self.url + path, json=body)
            await self.answered(r.status_code, r.content, r.headers.get("retry-after"))
            if r.status_code == 200:
                self.latencies.append(time.monotonic() - t0)
            return
        drop_after = rng.randint(1, 3) if rng.random() < self.drop_share else None
        async with client.stream("POST", self.url + path, json=body) as r:
            if r.status_code != 200:
                await self.answered(r.status_code, await r.aread(), r.headers.get("retry-after"))
                return
            await self.answered(200)
            events = 0
            last = None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                last = line
                if line != "data: [DONE]" and '"error"' in line and json.loads(line[6:]).get("error"):
                    self.fig.stream_error_events += 1
                    self.odd(line)
                if drop_after is not None and events >= drop_after:
                    self.fig.streams_dropped += 1   # leaving the block closes the connection
                    return
        self.fig.streams_read_to_end += 1
        if last == "data: [DONE]":
            self.fig.streams_ended_done += 1
            self.latencies.append(time.monotonic() - t0)
        else:
            self.odd(f"a stream ended with {last!r}")

    async def client(self, client: httpx.AsyncClient, k: int, model: str) -> None:
        rng = random.Random(self.seed * 100_003 + k)
        while time.monotonic() < self.deadline:
            try:
                await self.one(client, rng, model)
            except httpx.HTTPError as e:
                self.fig.client_errors += 1
                self.odd(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.1)

    async def run(self, proc=None) -> Figures:
        limits = httpx.Limits(max_connections=self.fig.clients + 8, max_keepalive_connections=self.fig.clients)
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
            model = (await client.get(self.url + "/v1/models")).json()["data"][0]["id"]
            rss = []

            async def sample_rss():
                await asyncio.sleep(self.fig.warmup_s)
                cache = (await gauges(client, self.url)).get(CACHE_BYTES, float("nan"))
                self.fig.cache_start_mb = cache / 2 ** 20
                while True:
                    rss.append(rss_mb(proc))
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample_rss()) if proc is not None else None
            self.deadline = time.monotonic() + self.fig.warmup_s + self.fig.duration_s
            await asyncio.gather(*(self.client(client, k, model) for k in range(self.fig.clients)))
            t_end = time.monotonic()
            while True:   # the server drains: every slot free, nothing running or waiting
                after = await gauges(client, self.url)
                self.fig.gauges_after = {name: after[name] for name in GAUGES if name in after}
                if not any(self.fig.gauges_after.values()) or time.monotonic() - t_end > 30:
                    break
                await asyncio.sleep(0.1)
            self.fig.drain_s = time.monotonic() - t_end
            self.fig.cache_end_mb = after.get(CACHE_BYTES, float("nan")) / 2 ** 20
            if sampler is not None:
                sampler.cancel()
                self.fig.rss_start_mb, self.fig.rss_max_mb = rss[0], max(rss)
                self.fig.rss_end_mb = rss_mb(proc)
        self.fig.latency_p50_s, self.fig.latency_p99_s = pct(self.latencies, 50), pct(self.latencies, 99)
        return self.fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:6006")
    p.add_argument("--clients", type=int, default=256)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="seconds of load before those, after which rss_start is read (default 0)")
    p.add_argument("--drop-share", type=float, default=0.15,
                   help="share of streams the client drops after 1-3 events (default 0.15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pid", type=int, default=None, help="the server's process id (RSS); default: found by port")
    p.add_argument("--no-rss", action="store_true", help="do not read the server's RSS (a remote server)")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args()
    proc = None if a.no_rss else server_process(a.url, a.pid)
    fig = asyncio.run(Soak(a.url, a.clients, a.duration, a.warmup, a.drop_share, a.seed).run(proc))
    for k, v in asdict(fig).items():
        print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(asdict(fig), f, indent=1)


if __name__ == "__main__":
    main()
