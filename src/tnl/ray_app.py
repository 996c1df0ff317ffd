"""tnl on Ray Serve: one endpoint over N replicas of tnl's engine, each request routed to the
replica that holds the state of its prompt's longest prefix.

    tnl serve --ray --num-replicas 2 [the other tnl serve flags]    # serve_ray
    serve run tnl.ray_app:app model=demo                             # or a config file (README)

Two deployments:

* `TnlReplica`: one tnl engine behind tnl's own FastAPI app (tnl.server.app.build_app, every
  route and middleware as `tnl serve` has them), driven in-process as an ASGI app: `forward`
  takes a request (its scope's fields and its whole body) and streams back the ASGI messages the
  app sends. It reports its state slots to the router (`record_routing_stats`), lends its cached
  states to other replicas (`export_longest`), and fails its health check when its engine stops.
* `TnlIngress`: the HTTP entry (Ray Serve's proxy sends it every request). It reads the body,
  computes the request's Route (tnl.ray_routing.route_for), and calls `forward` on the replica the
  router picks (tnl.ray_router.StateAffineRouter, the replica deployment's RequestRouterConfig).
  The response's start is held back until its first body bytes: a replica that fails before
  then (it died, say) costs nothing but a retry on another replica, once; after that the client
  gets a 503 in OpenAI's error shape, and a stream already under way ends with an error event and
  `data: [DONE]`. GET /metrics gathers every replica's metrics (a `replica` label on each
  sample); POST /v1/state/import and DELETE /v1/state/pins go to every replica.

A request whose state holder is saturated goes to another replica R with the holder's id; R
asks the holder for its longest cached prefix of the prompt and imports it (unpinned, as any
snapshot) when that saves at least `move_state_min_tokens` of prefill, else it computes the
prompt as any cache miss.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from tnl.ray_router import StateAffineRouter
from tnl.ray_routing import (
    Route,
    chat_messages,
    completion_prompt,
    route_for,
    seed_messages,
)
from tnl.server.config import DEFAULT_MOVE_STATE_MIN_TOKENS, ServerConfig, add_server_args
from tnl.server.errors import error_body, error_response
from tnl.server.middleware import APIKeyMiddleware, BodyLimitMiddleware, BodyNotRead

log = logging.getLogger(__name__)

APP_NAME = "tnl"
REPLICA_MAX_ONGOING = 4096   # tnl's engine queues and refuses (429) by itself; Ray's default (5) would cap the batch
INGRESS_MAX_ONGOING = 16384
ROUTING_STATS_PERIOD_S = 1.0
MOVE_TIMEOUT_S = 10.0        # a holder that does not lend its state by then is passed over (the prompt is computed)
FAN_OUT_TIMEOUT_S = 15.0     # per replica: GET /metrics, state imports and unpins go to each in turn
PARSE_IN_THREAD_BYTES = 1 << 16   # bodies larger than this are parsed for their route off the event loop


@dataclass(frozen=True)
class RayOptions:
    """How tnl runs on Ray Serve (the --ray flags of `tnl serve`, tnl.server.config.add_ray_args).

    num_replicas: engine replicas (None: Ray Serve's default, or what a config file sets).
    address: the Ray cluster to join (None: a local instance, or RAY_ADDRESS's).
    dashboard: whether a local instance starts Ray's dashboard.
    replica_gpus: GPUs per replica (None: 1 when the cluster has GPUs and the device is not cpu).
    replica_cpus: CPUs Ray reserves per replica.
    ingress_replicas: replicas of the ingress.
    router: "affine" or "random" (StateAffineRouter's policy).
    move_state_min_tokens: the least prefill a state move must save (0: no moves).
    imbalance: how many requests more than the least loaded replica a holder may have and still be chosen."""

    num_replicas: int | None = None
    address: str | None = None
    dashboard: bool = True
    replica_gpus: float | None = None
    replica_cpus: float = 1.0
    ingress_replicas: int = 1
    router: str = "affine"
    move_state_min_tokens: int = DEFAULT_MOVE_STATE_MIN_TOKENS
    imbalance: int = 8

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "RayOptions":
        names = {"address": "ray_address", "dashboard": "ray_dashboard", "router": "ray_router"}
        return cls(**{f.name: getattr(ns, names.get(f.name, f.name)) for f in dataclasses.fields(cls)
                      if hasattr(ns, names.get(f.name, f.name))})


# ---- in-process ASGI: a request's messages to and from tnl's app -------------------------------

def request_fields(scope: dict) -> dict:
    """What a replica needs of an HTTP request's ASGI scope (picklable)."""
    return {k: scope.get(k) for k in ("method", "path", "raw_path", "query_string", "headers", "client", "server",
                                      "scheme", "http_version")}


async def run_asgi(app, req: dict, body: bytes) -> AsyncIterator[list[dict]]:
    """Run one request through `app` in this process; yields the messages it sends, in batches
    (what was sent since the last batch). Closing the iterator early is a client disconnect."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "root_path": "",
             **{k: v for k, v in req.items() if v is not None}}
    scope["headers"] = [(bytes(k), bytes(v)) for k, v in req.get("headers") or ()]
    scope.setdefault("raw_path", scope["path"].encode())
    scope.setdefault("query_string", b"")
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False
    end = object()

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.put_nowait(message)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(end))
    started = finished = False
    try:
        while not finished:
            batch = [await sent.get()]
            while not sent.empty():
                batch.append(sent.get_nowait())
            if batch[-1] is end:
                batch.pop()
                finished = True
            messages = [m for m in batch if m.get("type", "").startswith("http.response.")]
            started = started or any(m["type"] == "http.response.start" for m in messages)
            if messages:
                yield messages
            if any(m["type"] == "http.response.body" and not m.get("more_body") for m in messages):
                finished = True
        if not started:   # tnl's app always answers (AccessLogMiddleware's last-resort 500); in case
            response = error_response("the replica's app ended without an answer", 500)
            yield [{"type": "http.response.start", "status": 500, "headers": response.raw_headers},
                   {"type": "http.response.body", "body": response.body, "more_body": False}]
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)   # the app ends its engine request itself
            except (asyncio.TimeoutError, Exception):
                task.cancel()


# ---- the engine replica --------------------------------------------------------------------------

def _cached_tokens(eng, ids: list[int]) -> int | None:
    """(On the engine thread.) The longest cached prefix of `ids`, in tokens; None: no cache."""
    cache = eng.core.prefix_cache
    if cache is None:
        return None
    entry = cache.lookup(ids)
    return entry.num_tokens if entry is not None else 0


def _longest_entry(eng, ids: list[int], min_tokens: int):
    """(On the engine thread.) The longest cached state before `ids`, copied to the host, if it
    covers at least `min_tokens`; else None."""
    cache = eng.core.prefix_cache
    entry = cache.lookup(ids) if cache is not None else None
    if entry is None or entry.num_tokens < min_tokens:
        return None
    return eng.core.state_entry(list(entry.ids))


def _import_unpinned(eng, ids, state, logits) -> None:
    """(On the engine thread.) A moved state joins the cache as an ordinary snapshot: evictable,
    unless it was pinned here already (a user's import)."""
    old = eng.core.prefix_cache.get(ids)
    pinned = old is not None and old.pinned
    eng.core.import_state(ids, state, logits).pinned = pinned


@serve.deployment(name="TnlReplica", max_ongoing_requests=REPLICA_MAX_ONGOING, health_check_period_s=5.0)
class TnlReplica:
    """One tnl engine and its app (see the module's docstring)."""

    async def __init__(self, config: ServerConfig, move_state_min_tokens: int = DEFAULT_MOVE_STATE_MIN_TOKENS):
        from uvicorn import Config
        from uvicorn.lifespan.on import LifespanOn

        from tnl.server.app import build_app
        from tnl.server.launch import SWITCH_INTERVAL_S, _configure_logging, engine_loader, resolve_model

        _configure_logging(config.log_level)
        sys.setswitchinterval(SWITCH_INTERVAL_S)   # as `tnl serve` (launch.py says why)
        self.config = config
        self.move_state_min_tokens = move_state_min_tokens
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._peers: DeploymentHandle | None = None
        path = await asyncio.to_thread(resolve_model, config)
        self.app = build_app(None, config, load_engine=engine_loader(config, path))
        self.state = self.app.state.tnl
        # the app's lifespan, as uvicorn (and Ray Serve's own ASGI ingress) runs it
        self._lifespan = LifespanOn(Config(self.app, lifespan="on", log_config=None, access_log=False))
        await self._lifespan.startup()
        while not self.state.ready:   # Serve sends requests once __init__ returns: load first
            if self.state.load_error is not None:
                raise RuntimeError(f"the model failed to load: {self.state.load_error}")
            await asyncio.sleep(0.05)
        log.info("replica %s ready", self.replica_id)

    async def forward(self, req: dict, body: bytes, route: Route | None = None) -> AsyncIterator[list[dict]]:
        """One HTTP request through this replica's tnl app; yields its ASGI messages in batches."""
        extra = [(b"x-tnl-replica", self.replica_id.encode())]
        if route is not None and route.holder not in (None, self.replica_id) and self.move_state_min_tokens:
            moved = await self._pull_state(req, body, route.holder)
            if moved:
                extra += [(b"x-tnl-state-moved-from", route.holder.encode()),
                          (b"x-tnl-state-moved-tokens", str(moved).encode())]
        async for batch in run_asgi(self.app, req, body):
            if batch[0]["type"] == "http.response.start":
                # Ray Serve's proxy adds its own x-request-id: tnl's (its access log's) is renamed
                headers = [(b"x-tnl-request-id" if k.lower() == b"x-request-id" else k, v)
                           for k, v in batch[0].get("headers", ())]
                batch[0] = {**batch[0], "headers": headers + extra}
            yield batch

    async def ping(self, route: Route | None = None) -> str:
        return self.replica_id

    async def export_longest(self, ids: list[int], min_tokens: int, route: Route | None = None) -> bytes | None:
        """The state file of the longest cached prefix of `ids`, if it covers at least
        `min_tokens` tokens (a cache read and a host copy: no state slot needed), else None."""
        from tnl.engine import state_file

        engine = self.state.require_engine()
        entry = await engine.call(lambda eng: _longest_entry(eng, ids, min_tokens))
        if entry is None:
            return None
        return await asyncio.to_thread(state_file.dumps, entry, engine.fingerprint, engine.model_config)

    async def _prompt_ids(self, path: str, body: bytes) -> list[int] | None:
        """The prompt's token ids as the route will compute them (near enough: they only pick
        which of the holder's states to move), or None."""
        try:
            raw = json.loads(body)
            if path == "/":
                return await self.state.encode_chat(seed_messages(raw), "prompt")
            if path == "/v1/chat/completions":
                return await self.state.encode_chat(chat_messages(raw), "messages",
                                                    raw.get("add_generation_prompt", True) is not False)
            if path == "/v1/completions":
                prompt = completion_prompt(raw)
                return prompt if isinstance(prompt, list) else await self.state.encode_text(prompt, "prompt")
        except Exception:   # a body the route will refuse: nothing to move
            return None
        return None

    async def _pull_state(self, req: dict, body: bytes, holder: str) -> int:
        """Move the longest prefix state of this request from `holder`, when it saves at least
        move_state_min_tokens of prefill here. Returns the tokens moved (0: none). Any failure
        only means computing the prompt."""
        from tnl.engine import state_file

        try:
            ids = await self._prompt_ids(req["path"], body)
            engine = self.state.require_engine()
            own = await engine.call(lambda eng: _cached_tokens(eng, ids)) if ids else None
            if own is None:
                return 0
            if self._peers is None:
                ctx = serve.get_replica_context()
                self._peers = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
            response = self._peers.export_longest.remote(ids, own + self.move_state_min_tokens,
                                                         route=Route(target=holder))
            try:
                data = await asyncio.wait_for(asyncio.ensure_future(response), MOVE_TIMEOUT_S)
            except asyncio.TimeoutError:
                response.cancel()
                log.warning("replica %s did not lend its state within %g s: computing the prompt", holder,
                            MOVE_TIMEOUT_S)
                return 0
            if data is None:
                return 0
            moved_ids, st, logits = await asyncio.to_thread(state_file.loads, data, engine.fingerprint,
                                                            engine.model_config)
            await engine.call(lambda eng: _import_unpinned(eng, moved_ids, st, logits))
            log.info("moved a state of %d tokens (%d cached here before) from replica %s", len(moved_ids), own,
                     holder)
            return len(moved_ids)
        except Exception as e:
            log.warning("moving a state from replica %s failed (%s: %s): computing the prompt", holder,
                        type(e).__name__, e)
            return 0

    def record_routing_stats(self) -> dict:
        """Polled by Ray Serve's controller and handed to the routers (RunningReplica.routing_stats)."""
        engine = self.state.engine
        stats = engine.stats() if engine is not None else {}
        return {"slots": int(stats["slots_total"]) if stats.get("slots_total") else None,
                "running": int(stats.get("running", 0)), "waiting": int(stats.get("waiting", 0))}

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose health check raises."""
        if self.state.load_error is not None:
            raise RuntimeError(f"the model failed to load: {self.state.load_error}")
        error = getattr(self.state.engine, "error", None)
        if error is not None:
            raise RuntimeError(f"the engine stopped: {error}")

    async def __del__(self):
        # Ray Serve has let running requests finish (graceful_shutdown_timeout_s); the engine stops
        await self._lifespan.shutdown()


# ---- the ingress -------------------------------------------------------------------------------

class _ASGIResponse(Response):
    """A handler's answer that is itself an ASGI app (Ray Serve calls it with the request's
    scope, receive and send)."""

    def __init__(self, app):
        self.app = app
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


def _is_event_stream(start: dict) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"])


async def _send_error(send, message: str, status: int) -> None:
    response = error_response(message, status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Prometheus text of several replicas as one exposition: each sample gets a `replica`
    label, the samples of one metric stay together under one HELP and TYPE."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            merged.samples += [s._replace(labels={"replica": replica, **s.labels}) for s in fam.samples]

    class Collector:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)


@serve.deployment(name="TnlIngress", max_ongoing_requests=INGRESS_MAX_ONGOING)
class TnlIngress:
    """The endpoint: every HTTP request, forwarded to the replica the router picks."""

    def __init__(self, replicas: DeploymentHandle, config: ServerConfig):
        self.replicas = replicas
        self.config = config
        # tnl's own checks before a body is read: the key (an unauthenticated client cannot make
        # the ingress read megabytes), then the body's size; the replica's app checks again
        asgi = BodyLimitMiddleware(self._handle, max_bytes=config.max_body_mb * 2 ** 20)
        self._asgi = APIKeyMiddleware(asgi, api_key=config.api_key) if config.api_key else asgi

    async def __call__(self, request: Request) -> Response:
        return _ASGIResponse(self._asgi)

    async def _handle(self, scope, receive, send) -> None:
        try:
            body = await self._read_body(receive)
        except BodyNotRead as e:
            response = error_response(e.detail, e.status_code, None, e.headers)
            return await response(scope, receive, send)
        req = request_fields(scope)
        method, path = req["method"], req["path"]
        if method == "GET" and path == "/metrics":
            return await self._metrics(req, send)
        if (method, path) in (("POST", "/v1/state/import"), ("DELETE", "/v1/state/pins")):
            return await self._to_every_replica(req, body, send)
        if len(body) > PARSE_IN_THREAD_BYTES:
            route = await asyncio.to_thread(route_for, method, path, body)
        else:
            route = route_for(method, path, body)
        await self._proxy(req, body, route, send)

    @staticmethod
    async def _read_body(receive) -> bytes:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BodyNotRead(499, "the client disconnected before its request body was complete")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _proxy(self, req: dict, body: bytes, route: Route, send) -> None:
        """Forward to a replica, retrying once on another when it fails before the answer's first
        byte went out."""
        for attempt in range(2):
            start, started = None, False
            stream = self.replicas.options(stream=True).forward.remote(req, body, route=route)
            try:
                async for batch in stream:
                    for message in batch:
                        if message["type"] == "http.response.start":
                            start = message
                            continue
                        if not started:
                            await send(start)
                            started = True
                        await send(message)
                return
            except asyncio.CancelledError:   # the client left: so does the replica's request
                stream.cancel()
                raise
            except Exception as e:
                failed = route.replica or "?"
                log.warning("request %s %s failed on replica %s (%s: %s)%s", req["method"], req["path"], failed,
                            type(e).__name__, e, "" if started or attempt else "; retrying on another replica")
                message = (f"the replica serving this request failed ({type(e).__name__}); Ray Serve restarts "
                           f"it; send the request again")
                if started:
                    if _is_event_stream(start):
                        event = f"data: {json.dumps(error_body(message, 503))}\n\ndata: [DONE]\n\n"
                        await send({"type": "http.response.body", "body": event.encode(), "more_body": False})
                    else:   # a body cut short: the client sees its length or its connection break
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                if attempt == 0:
                    route = dataclasses.replace(route, avoid=route.avoid | {failed}, replica=None, holder=None)
                    continue
                await _send_error(send, message, 503)
                return

    async def _replica_ids(self) -> list[str]:
        route = Route(list_replicas=True)
        await self.replicas.ping.remote(route=route)
        return [rid for rid, _ in route.replicas]

    async def _on(self, replica: str, req: dict, body: bytes) -> tuple[int, list, bytes]:
        """The whole answer of one replica to one request: (status, headers, body)."""
        status, headers, chunks = 500, [], []
        async for batch in self.replicas.options(stream=True).forward.remote(req, body, route=Route(target=replica)):
            for message in batch:
                if message["type"] == "http.response.start":
                    status, headers = message["status"], message.get("headers", [])
                else:
                    chunks.append(message.get("body", b""))
        return status, headers, b"".join(chunks)

    async def _on_every_replica(self, req: dict, body: bytes) -> dict[str, tuple[int, list, bytes] | Exception]:
        """Each replica's answer, one replica after the other: calls made at once from one HTTP
        request share its Ray Serve request id, by which Ray's router hands each call its
        replica, so concurrent ones could get each other's replicas, or none."""
        replicas = await asyncio.wait_for(self._replica_ids(), FAN_OUT_TIMEOUT_S)
        answers: dict[str, tuple[int, list, bytes] | Exception] = {}
        for r in replicas:
            try:
                answers[r] = await asyncio.wait_for(self._on(r, req, body), FAN_OUT_TIMEOUT_S)
            except Exception as e:   # (a replica that died meanwhile: the others still answer)
                answers[r] = e
        return answers

    async def _metrics(self, req: dict, send) -> None:
        """Every replica's GET /metrics in one exposition, a `replica` label on each sample."""
        from prometheus_client import CONTENT_TYPE_LATEST

        answers = await self._on_every_replica(req, b"")
        texts = {r: a[2].decode() for r, a in answers.items() if not isinstance(a, BaseException) and a[0] == 200}
        if not texts:
            first = next((a for a in answers.values() if not isinstance(a, BaseException)), None)
            if first is not None:   # the replicas' own refusal (401 without the key, ...)
                await send({"type": "http.response.start", "status": first[0], "headers": first[1]})
                await send({"type": "http.response.body", "body": first[2], "more_body": False})
                return
            return await _send_error(send, "no replica answered GET /metrics", 503)
        for r, a in answers.items():
            if r not in texts:
                log.warning("GET /metrics: replica %s did not answer (%s)", r, a if isinstance(a, BaseException)
                            else f"status {a[0]}")
        data = merge_metrics(texts)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _to_every_replica(self, req: dict, body: bytes, send) -> None:
        """A state import (or an unpin) concerns every replica: a conversation may go to any.
        The answer is the first replica's success (unpins: the sum), else the first refusal."""
        answers = await self._on_every_replica(req, body)
        ok = [a for a in answers.values() if not isinstance(a, BaseException) and a[0] == 200]
        for r, a in answers.items():
            if isinstance(a, BaseException) or a[0] != 200:
                log.warning("%s %s: replica %s refused it: %s", req["method"], req["path"], r,
                            a if isinstance(a, BaseException) else f"{a[0]} {a[2][:300]!r}")
        done = f"{len(ok)}/{len(answers)}".encode()
        if ok and req["path"] == "/v1/state/pins":
            data = json.dumps({"unpinned": sum(json.loads(a[2])["unpinned"] for a in ok)}).encode()
            ok = [(200, [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
                   data)]
        answer = ok[0] if ok else next((a for a in answers.values() if not isinstance(a, BaseException)), None)
        if answer is None:
            return await _send_error(send, f"no replica answered {req['method']} {req['path']}", 503)
        await send({"type": "http.response.start", "status": answer[0],
                    "headers": [*answer[1], (b"x-tnl-replicas-done", done)]})
        await send({"type": "http.response.body", "body": answer[2], "more_body": False})


# ---- building and running the application --------------------------------------------------------

def _cluster_has_gpus() -> bool:
    import ray
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_application(config: ServerConfig, options: RayOptions = RayOptions()):
    """The Ray Serve application: the ingress over `options.num_replicas` engine replicas."""
    gpus = options.replica_gpus
    if gpus is None:
        gpus = 1.0 if config.device != "cpu" and _cluster_has_gpus() else 0.0
    if not gpus and config.device == "auto":
        config = dataclasses.replace(config, device="cpu")   # no GPU reserved: use none
    replica_options = dict(
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": gpus},
        request_router_config=RequestRouterConfig(
            request_router_class=StateAffineRouter,
            request_router_kwargs={"policy": options.router, "imbalance": options.imbalance},
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S),
        graceful_shutdown_timeout_s=config.graceful_shutdown_s + 5)
    if options.num_replicas is not None:
        replica_options["num_replicas"] = options.num_replicas
    replicas = TnlReplica.options(**replica_options).bind(config, options.move_state_min_tokens)
    return TnlIngress.options(num_replicas=options.ingress_replicas,
                              ray_actor_options={"num_cpus": 0}).bind(replicas, config)


def _argv(args: dict) -> list[str]:
    """`serve run` / config-file args ({"max-num-seqs": 64, "no-enable-prefix-caching": true})
    as `tnl serve` flags."""
    argv = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def app(args: dict):
    """The application builder of `serve run tnl.ray_app:app [key=value ...]` and of config
    files (`import_path: tnl.ray_app:app`, `args:`): the args are `tnl serve`'s flags, without
    the dashes ({"model": "OpenNLPLab/TransNormerLLM-7B", "max-num-seqs": 256})."""
    parser = argparse.ArgumentParser(prog="tnl.ray_app:app", exit_on_error=False)
    add_server_args(parser)
    try:
        ns = parser.parse_args(_argv(args))
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"tnl.ray_app:app args: {e} (the args are tnl serve's flags, e.g. "
                         f"{{'model': 'demo', 'max-num-seqs': 64}})") from None
    return build_application(ServerConfig.from_args(ns), RayOptions.from_args(ns))


def serve_ray(config: ServerConfig, options: RayOptions) -> int:
    """`tnl serve --ray`: the application on a local Ray instance (or options.address), at
    config.host:config.port, until SIGTERM / Ctrl-C. Returns 0."""
    import ray

    from tnl.server.launch import StartupError, _configure_logging, listen_socket

    _configure_logging(config.log_level)
    sock = listen_socket(config.host, config.port)   # a busy port is one clear error, before Ray starts
    port = sock.getsockname()[1]
    sock.close()
    joined = options.address is not None or bool(os.environ.get("RAY_ADDRESS"))   # a cluster not ours
    ray.init(address=options.address, **({} if joined else {"include_dashboard": options.dashboard}))
    try:
        serve.start(http_options={"host": config.host, "port": port})
        try:
            serve.run(build_application(config, dataclasses.replace(
                options, num_replicas=options.num_replicas or 1)), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise StartupError(f"the Ray Serve application did not start: {e}") from None
        log.info("serving on http://%s:%d through Ray Serve: %d replicas, %s routing", config.host, port,
                 options.num_replicas or 1, options.router)
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopping the Ray Serve application")
    finally:
        if joined:
            serve.delete(APP_NAME)   # the cluster and its other applications stay
        else:
            serve.shutdown()
            ray.shutdown()
    return 0
