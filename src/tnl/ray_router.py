"""The Ray Serve request router of tnl's replica deployment: state-affine routing (tnl.ray_routing
says how it decides).

This module holds the router class alone, because Ray Serve pickles the module of a custom
request router by value (RequestRouterConfig): the classes it shares with the ingress (Route)
must come from another module, which is pickled by reference, or `isinstance` would fail.
"""
from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from tnl.ray_routing import DEFAULT_IMBALANCE, DEFAULT_INDEX_ENTRIES, PrefixIndex, Route, choose



class StateAffineRouter(RequestRouter):
    """tnl's request router for the replica deployment (see the module's docstring).

    request_router_kwargs: policy ("affine", the default, or "random": a uniformly random replica,
    the baseline benchmarks/ray_bench.py compares against), imbalance, index_entries."""

    def initialize_state(self, policy: str = "affine", imbalance: int = DEFAULT_IMBALANCE,
                         index_entries: int = DEFAULT_INDEX_ENTRIES, **kwargs) -> None:
        if policy not in ("affine", "random"):
            raise ValueError(f"unknown routing policy {policy!r}: expected 'affine' or 'random'")
        self.policy = policy
        self.imbalance = imbalance
        self.index = PrefixIndex(index_entries)

    def _load(self, r: RunningReplica) -> int:
        n = self.replica_queue_len_cache.get(r.replica_id)
        return n if n is not None else 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # Ray Serve asks again at once when no replica here takes the request (all full, or a
        # target gone): without a backoff between the rounds its router loop would spin, and
        # starve every other request of this process
        pending_request.routing_context.should_backoff = True
        route = pending_request.kwargs.get("route")
        if not isinstance(route, Route):
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if route.list_replicas:
            route.replicas = [(rid, dict(r.routing_stats or {})) for rid, r in by_id.items()]
        if route.target is not None:
            # a call for one replica: none if it is gone (the caller's timeout ends the wait)
            return [[by_id[route.target]]] if route.target in by_id else []
        usable = {rid: r for rid, r in by_id.items() if rid not in route.avoid} or by_id
        if self.policy == "random":
            return [[random.choice(list(usable.values()))]]
        loads = {rid: self._load(r) for rid, r in usable.items()}
        slots = {rid: (r.routing_stats or {}).get("slots") for rid, r in usable.items()}
        ranks, holder = choose(route.chain, loads, slots, self.index, self.imbalance)
        route.holder = holder
        return [[usable[rid] for rid in rank] for rank in ranks if rank]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        route = pending_request.kwargs.get("route")
        if not isinstance(route, Route):
            return
        rid = replica_id.unique_id
        route.replica = rid
        if route.holder == rid:
            route.holder = None   # it went to the holder after all (the others refused it)
        if route.chain and route.target is None:
            self.index.insert(route.chain, rid)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = set(self.curr_replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self.index.drop(replica_id.unique_id)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.drop(replica_id.unique_id)
