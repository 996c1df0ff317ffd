"""The async front: an LLMEngine driven by a background thread, each request with an output
stream on the caller's event loop. `EngineClient` is what the HTTP server may use of it.

Threads: the caller's event loop submits (validation and the queue check happen there, so a
refusal is an exception at once), then puts the request in the inbox; the engine thread
drains the inbox, steps, and hands each step's outputs to the requests' sinks through one
`call_soon_threadsafe` per event loop (the outbox).

The waiting queue is counted here, on the caller's side, under one lock: a request counts
from its submit until the scheduler gives it a slot (`Scheduler.on_admit`), or until it is
aborted, which takes effect at once, not when the engine thread next reads its inbox (that
is only between steps, and a long prefill step made aborted requests fill the queue). The
rules, in `submit_group`: --max-waiting requests wait at most; the requests of one group
(one HTTP request's n × prompts) are queued all together or not at all; and a full queue is
shared fairly between clients.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from tnl.config import EngineConfig, ModelConfig
from tnl.engine.errors import InvalidRequest, QueueFullError
from tnl.engine.request import Request, RequestOutput
from tnl.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


Sink = Callable[[RequestOutput | BaseException], None]


@dataclass
class Job:
    """One request of a group handed to `AsyncEngine.submit_group`."""

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str
    sink: Sink   # gets each output delta, the last one finished, or the exception that ended it
    boundaries: list[int] | None = None   # prompt lengths worth a prompt-state snapshot (LLMEngine.add_request)


class EngineClient(Protocol):
    """The engine as the server sees it (tnl.engine.AsyncEngine is the one implementation)."""

    tokenizer: object | None
    model_config: ModelConfig
    engine_config: EngineConfig
    ready: bool
    error: BaseException | None

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    async def prepare(self, params: list[SamplingParams]) -> None: ...

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, sink: Sink,
               boundaries: list[int] | None = None, client: str = "") -> None: ...

    def submit_group(self, jobs: list[Job], client: str = "", validate: bool = True) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...

    fingerprint: str   # the model's (tnl.engine.state_file.model_fingerprint)

    async def export_state(self, token_ids: list[int]) -> bytes: ...

    async def import_state(self, data: bytes) -> int: ...

    async def unpin_states(self) -> int: ...


def _put_all(items: list) -> None:
    for sink, item in items:
        sink(item)


def _settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result, error: BaseException | None) -> None:
    """Hand a `call`'s outcome to its caller's loop (from the engine thread)."""
    def done() -> None:
        if fut.done():   # the caller was cancelled
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:  # the caller's loop is gone
        pass


def _ignore(item) -> None:
    """The sink of an evicted request until the engine has ended it (its id stays in use)."""


class _Group:
    """The requests of one submit_group call, and how many of them still wait for a slot."""

    __slots__ = ("client", "request_ids", "num_queued")

    def __init__(self, client: str, request_ids: list[str]):
        self.client = client
        self.request_ids = request_ids
        self.num_queued = len(request_ids)


class AsyncEngine:
    """An LLMEngine driven by a background thread; each request gets an async output stream."""

    def __init__(self, engine):
        """engine: a tnl.engine.LLMEngine, owned by this front from now on."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.engine_config = engine.engine_config
        self.fingerprint = engine.core.fingerprint
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, list] = {}   # request id -> [its event loop, its sink]
        # The waiting queue as submit counts it (under _lock): each request from its submit
        # until it gets a slot or is aborted, by group, and per client.
        self._lock = threading.Lock()
        self._queued: dict[str, _Group] = {}       # request id -> its group
        self._held: dict[str, int] = {}            # client -> its requests in _queued
        self._groups: dict[str, list[_Group]] = {}   # client -> its groups with queued requests, oldest first
        engine.scheduler.on_admit = self._on_admit
        self._stop = False
        self._stats = engine.stats()
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._idle_s = 0.0   # time the engine thread waited with nothing to run
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="tnl-engine", daemon=True)
        self._thread.start()
        self.ready = True

    # ---- public API -------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest (naming the field) for a request the engine cannot run."""
        self.engine.validate(prompt_token_ids, params)

    async def prepare(self, params: list[SamplingParams]) -> None:
        """Compile the structured-output constraints of these params in the engine's compile
        pool, awaiting them here: neither this event loop nor the engine thread waits for a
        compile, and a constraint that cannot compile raises InvalidRequest (naming the field)
        before anything is queued. The engine thread then finds them compiled. A no-op for
        params without one."""
        pending = self.engine.start_compiles(params)
        if not pending:
            return
        grammars = await asyncio.gather(*(asyncio.wrap_future(fut) for _, fut in pending))
        for (spec, _), grammar in zip(pending, grammars):
            spec.compiled = (self.engine.structured, grammar)

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, sink: Sink,
               boundaries: list[int] | None = None, client: str = "") -> None:
        """Queue one request: `submit_group` of one job."""
        self.submit_group([Job(prompt_token_ids, params, request_id, sink, boundaries)], client)

    def submit_group(self, jobs: list[Job], client: str = "", validate: bool = True) -> None:
        """Queue the requests of one caller's request (an HTTP request's n × prompts) all
        together, or none of them. Each job's `sink(item)` is then called on the calling
        thread's event loop with each output delta, the last one `finished`, or with the
        exception that ended the request. Errors found at once raise here instead, and then
        nothing was queued: a bad prompt (unless validate=False: the caller checked each job),
        an id in use, more jobs than can ever wait at once (InvalidRequest), no room
        (QueueFullError), a dead engine. No task per request: the HTTP server's streams read
        their outputs straight from the sinks.

        The waiting queue (W = max_waiting, --max-waiting) holds each request from its submit
        until it gets a state slot. Admission, for a group of n requests from `client` (its API
        key, or its address):
        - n > W can never be queued: InvalidRequest, whatever the load.
        - If n requests fit in the free places, they are queued: a client alone may fill the
          whole queue.
        - Otherwise, fair share: with k clients holding queued requests (this one counted),
          each may hold W // k (at least 1). If this client would still be within its share,
          room is made by refusing the newest groups of the clients holding more than their
          share, the client holding the most first: the requests of those groups get
          QueueFullError on their sinks (an HTTP 429) and are aborted. Else this group is
          refused (QueueFullError). So a client flooding the queue cannot keep another out.
        """
        if validate:
            for job in jobs:
                self.engine.validate(job.prompt_token_ids, job.params)
        ids = [job.request_id for job in jobs]
        if len(set(ids)) < len(ids):
            raise InvalidRequest(None, "the request ids of one group must differ")
        for rid in ids:
            if rid in self._streams:
                raise InvalidRequest(None, f"request id {rid!r} is already in use")
        loop = asyncio.get_running_loop()
        with self._lock:
            for group in self._make_room(len(jobs), client):
                self._evict(group)
            for job in jobs:
                self._streams[job.request_id] = [loop, job.sink]
            if self.error is not None:   # (after registering: a dying engine either sees these streams or set this)
                for rid in ids:
                    self._streams.pop(rid, None)
                raise RuntimeError(f"engine stopped after an internal error: {self.error}")
            group = _Group(client, ids)
            for job in jobs:
                self._queued[job.request_id] = group
                self._inbox.put(("add", job.request_id, list(job.prompt_token_ids), job.params, job.boundaries))
            self._held[client] = self._held.get(client, 0) + len(jobs)
            self._groups.setdefault(client, []).append(group)
        self._wake.set()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's output deltas as an async stream; leaving the loop early aborts it."""
        await self.prepare([params])
        q: asyncio.Queue = asyncio.Queue()
        self.submit(prompt_token_ids, params, request_id, q.put_nowait)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """End a request: if it is still waiting for a slot, its place in the queue is free at
        once; the engine thread ends it (a last delta, finish_reason "abort") at its next look."""
        with self._lock:
            self._unqueue(request_id)
            self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, float]:
        """The engine's gauges and counters as of its last step; "waiting" is the count that
        submit admits by (from submit until a slot, aborts at once), never a step behind."""
        return {**self._stats, "waiting": len(self._queued), "idle_s": self._idle_s}

    # ---- state files (tnl.engine.state_file; imported here, so the server loads no torch) ------
    async def call(self, fn: Callable[[object], object]):
        """Run fn(engine) on the engine thread between two steps (the engine's state is that
        thread's alone) and return its result here, or raise its exception here."""
        if self.error is not None:
            raise RuntimeError(f"engine stopped after an internal error: {self.error}")
        if self._stop:
            raise RuntimeError("the engine is shut down")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._inbox.put(("call", fn, loop, fut))
        self._wake.set()
        return await fut

    async def export_state(self, token_ids: list[int]) -> bytes:
        """The state file of the cached state after exactly `token_ids` (a request over them
        must have put it there: one with max_tokens >= 1 keeps its prompt's end). Serialized off
        the engine thread. Raises state_file.StateCacheError when the cache does not hold it."""
        from tnl.engine import state_file
        entry = await self.call(lambda eng: eng.core.state_entry(token_ids))
        return await asyncio.to_thread(state_file.dumps, entry, self.fingerprint, self.model_config)

    async def import_state(self, data: bytes) -> int:
        """Check a state file (off the engine thread) and pin its state in the cache. Returns
        its number of tokens. Raises state_file.StateFileError (nothing cached) or StateCacheError."""
        from tnl.engine import state_file
        ids, state, logits = await asyncio.to_thread(state_file.loads, data, self.fingerprint, self.model_config)
        await self.call(lambda eng: eng.core.import_state(ids, state, logits))
        return len(ids)

    async def unpin_states(self) -> int:
        return await self.call(lambda eng: eng.core.unpin_states())

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- the waiting queue (callers hold _lock) ----------------------------------------------
    def _make_room(self, n: int, client: str) -> list[_Group]:
        """The groups to evict so that n requests of `client` fit (submit_group's rules), or raise."""
        W = self.engine_config.max_waiting
        if n > W:
            raise InvalidRequest(None, f"at most {W} requests may wait for a slot at once (--max-waiting {W}): "
                                       f"{n} together can never be queued")
        free = W - len(self._queued)
        if n <= free:
            return []
        held = dict(self._held)
        clients = len(held) + (client not in held)
        share = max(1, W // clients)
        if held.get(client, 0) + n > share:
            raise QueueFullError(self._full_message(client, share, clients))
        victims: list[_Group] = []
        taken: dict[str, int] = {}
        while free < n:
            hog = max(held, key=held.get)   # (of those holding the most, the first to queue)
            if held[hog] <= share:
                raise QueueFullError(self._full_message(client, share, clients))
            taken[hog] = taken.get(hog, 0) + 1
            group = self._groups[hog][-taken[hog]]   # its newest group not taken yet
            victims.append(group)
            held[hog] -= group.num_queued
            free += group.num_queued
        return victims

    def _full_message(self, client: str, share: int, clients: int) -> str:
        W = self.engine_config.max_waiting
        return (f"waiting queue is full ({W} requests); this client holds {self._held.get(client, 0)} of them, and "
                f"its fair share while {clients} clients wait is {share}; retry later")

    def _evict(self, group: _Group) -> None:
        """Refuse a queued group to make room for another client: QueueFullError on the sinks of
        its requests, and an abort for each (those already running stop too)."""
        W = self.engine_config.max_waiting
        err = QueueFullError(f"waiting queue is full ({W} requests) and another client needed room: this client "
                             f"held more than its fair share, and its newest request was refused; retry later")
        log.info("waiting queue full: %d requests of a client above its fair share refused", len(group.request_ids))
        for rid in group.request_ids:
            self._unqueue(rid)
            entry = self._streams.get(rid)
            if entry is not None:
                loop, sink = entry
                entry[1] = _ignore   # (in place: the id stays in use until the engine has ended it)
                try:
                    loop.call_soon_threadsafe(sink, err)
                except RuntimeError:  # the client's loop is gone
                    pass
            self._inbox.put(("abort", rid))

    def _unqueue(self, request_id: str) -> None:
        """The request no longer waits (it got a slot, was aborted or refused)."""
        group = self._queued.pop(request_id, None)
        if group is None:
            return
        group.num_queued -= 1
        c = group.client
        self._held[c] -= 1
        if not self._held[c]:
            del self._held[c]
        if not group.num_queued:
            groups = self._groups[c]
            groups.remove(group)
            if not groups:
                del self._groups[c]

    # ---- engine thread ----------------------------------------------------------------------
    def _on_admit(self, req: Request) -> None:
        """The scheduler gave `req` a slot: it no longer waits (nor can it be evicted)."""
        with self._lock:
            self._unqueue(req.request_id)

    def _deliver(self, request_id: str, item) -> None:
        """Queue `item` for the request's sink; a final item (finished, or an error) also ends
        the stream's registration."""
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, sink = entry
            self._outbox.setdefault(loop, []).append((sink, item))
            if isinstance(item, BaseException) or item.finished:
                self._streams.pop(request_id, None)

    def _flush(self) -> None:
        """Hand this step's outputs over: one wake-up per event loop, not one per request."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the client's loop is gone
                pass

    def _drain_inbox(self) -> None:
        eng = self.engine
        drained = False
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "add":
                _, rid, ids, params, boundaries = msg
                try:   # (submit checked it)
                    eng.add_request(ids, params, request_id=rid, validate=False, boundaries=boundaries)
                except (InvalidRequest, QueueFullError) as e:
                    with self._lock:
                        self._unqueue(rid)
                    self._deliver(rid, e)
            elif msg[0] == "call":
                _, fn, loop, fut = msg
                try:
                    result, error = fn(eng), None
                except Exception as e:   # the caller's to handle; the engine goes on
                    result, error = None, e
                _settle(loop, fut, result, error)
            else:
                req = eng.abort(msg[1])
                if req is not None and req.finished:
                    self._emit(req)
            drained = True
        if drained:
            self._stats = eng.stats()

    def _emit(self, req: Request) -> None:
        if req.request_id in self._streams:
            out = self.engine.take_delta(req)
            if out.outputs[0].token_ids or out.outputs[0].text or out.finished or out.prompt_logprobs:
                self._deliver(req.request_id, out)
        if req.finished:
            self.engine.release(req.request_id)

    def _loop(self) -> None:
        eng = self.engine
        if eng.device.type == "cuda":
            import torch
            torch.cuda.set_device(eng.device)   # events, streams and graphs of this thread on the engine's GPU
        try:
            while not self._stop:
                self._drain_inbox()
                self._flush()
                if not eng.has_work:
                    t0 = time.perf_counter()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    self._idle_s += time.perf_counter() - t0
                    self._stats = eng.stats()   # (picks up the device time of the last steps)
                    continue
                touched = eng.step()
                self._stats = eng.stats()   # before the outputs go out: a client never sees stale gauges
                for req in touched:
                    self._emit(req)
                self._flush()
        except BaseException as e:  # keep the server answering: every open stream gets the error
            log.exception("engine loop died")
            self.error = e
            for rid in list(self._streams):
                self._deliver(rid, RuntimeError(f"internal engine error: {e}"))
            self._flush()
        finally:   # calls still in the inbox get an answer: the engine is gone
            while True:
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if msg[0] == "call":
                    _settle(msg[2], msg[3], None, RuntimeError("the engine stopped before it ran this call"))
