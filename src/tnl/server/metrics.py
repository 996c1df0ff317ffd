"""Prometheus metrics, one registry per app (tests build several apps in one process)."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets in seconds: sub-millisecond CPU decode steps up to multi-minute generations.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
            2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class _EngineStatsCollector:
    """Gauges and counters read from engine.stats() at scrape time, so they are never stale.

    The counters tell where serving time goes: tokens per step (decode_tokens / steps) is the
    batch the engine actually ran; device busy (CUDA) and idle seconds against the wall clock
    say whether the device, the host or the clients set the pace."""

    GAUGES = (
        ("tnl_num_requests_running", "Requests holding a state slot and decoding", "running"),
        ("tnl_num_requests_waiting", "Requests waiting for a state slot", "waiting"),
        ("tnl_state_slots_used", "State-pool slots in use", "slots_used"),
        ("tnl_state_slots_total", "State-pool slots in all", "slots_total"),
        ("tnl_prefix_cache_entries", "Prompt-state snapshots held by the cache", "prefix_cache_entries"),
        ("tnl_prefix_cache_bytes", "Bytes held by the prompt-state cache's snapshots", "prefix_cache_bytes"),
    )

    COUNTERS = (
        ("tnl_engine_steps", "Engine steps run (one forward pass each)", "steps"),
        ("tnl_engine_prefill_steps", "Engine steps that computed prompt tokens", "prefill_steps"),
        ("tnl_engine_prefill_tokens", "Prompt tokens computed by the engine (chunks included)", "prefill_tokens"),
        ("tnl_engine_decode_tokens", "Decode rows computed by the engine (one per sequence per step)",
         "decode_tokens"),
        ("tnl_engine_device_busy_seconds", "Device time of the engine's steps (CUDA events; 0 on CPU)",
         "device_busy_s"),
        ("tnl_engine_prefill_step_device_seconds", "Device time of the steps that computed prompt tokens",
         "prefill_step_busy_s"),
        ("tnl_engine_idle_seconds", "Time the engine thread waited with no request to run", "idle_s"),
        ("tnl_prefix_cache_queries", "Prompts looked up in the prompt-state cache", "prefix_cache_queries"),
        ("tnl_prefix_cache_hits", "Lookups that found a cached prefix", "prefix_cache_hits"),
        ("tnl_prefix_cache_query_tokens", "Prompt tokens of the prompts looked up", "prefix_cache_query_tokens"),
        ("tnl_prefix_cache_hit_tokens", "Prompt tokens taken from the cache instead of computed",
         "prefix_cache_hit_tokens"),
        ("tnl_prefix_cache_evictions", "Snapshots evicted to stay within the cache's budget",
         "prefix_cache_evictions"),
    )

    def __init__(self, stats: Callable[[], dict | None]):
        self._stats = stats

    def _metrics(self):
        """(family class, name, doc, stats key) of every metric."""
        for kind, table in ((GaugeMetricFamily, self.GAUGES), (CounterMetricFamily, self.COUNTERS)):
            for name, doc, key in table:
                yield kind, name, doc, key

    def describe(self):  # lets the registry check names without calling the engine
        return [kind(name, doc) for kind, name, doc, _ in self._metrics()]

    def collect(self):
        stats = self._stats() or {}
        for kind, name, doc, key in self._metrics():
            family = kind(name, doc)
            family.add_metric([], float(stats.get(key, 0)))
            yield family


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tnl_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.ttft = Histogram("tnl_time_to_first_token_seconds",
                              "From arrival in the engine to the first generated token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("tnl_inter_token_latency_seconds",
                             "Time between consecutive outputs of one sequence, per token",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("tnl_e2e_request_latency_seconds",
                             "From the HTTP request's arrival to its last token",
                             buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("tnl_queue_time_seconds",
                                    "From arrival in the engine to first being scheduled",
                                    buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("tnl_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("tnl_generation_tokens", "Tokens generated", registry=r)
        r.register(_EngineStatsCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
