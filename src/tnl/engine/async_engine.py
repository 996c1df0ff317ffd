"""The async front: an LLMEngine driven by a background thread, each request with an output
stream on the caller's event loop. `EngineClient` is what the HTTP server may use of it.

Threads: the caller's event loop submits (validation and the queue check happen there, so a
refusal is an exception at once), then puts the request in the inbox; the engine thread
drains the inbox, steps, and hands each step's outputs to the requests' sinks through one
`call_soon_threadsafe` per event loop (the outbox).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from tnl.config import EngineConfig, ModelConfig
from tnl.engine.errors import InvalidRequest, QueueFullError
from tnl.engine.request import Request, RequestOutput
from tnl.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineClient(Protocol):
    """The engine as the server sees it (tnl.engine.AsyncEngine is the one implementation)."""

    tokenizer: object | None
    model_config: ModelConfig
    engine_config: EngineConfig
    ready: bool
    error: BaseException | None

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
               sink: Callable[[RequestOutput | BaseException], None]) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


def _put_all(items: list) -> None:
    for sink, item in items:
        sink(item)


class AsyncEngine:
    """An LLMEngine driven by a background thread; each request gets an async output stream."""

    def __init__(self, engine):
        """engine: a tnl.engine.LLMEngine, owned by this front from now on."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.engine_config = engine.engine_config
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Callable]] = {}
        self._pending = 0
        self._lock = threading.Lock()
        self._stop = False
        self._stats = engine.stats()
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._idle_s = 0.0   # time the engine thread waited with nothing to run
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="tnl-engine", daemon=True)
        self._thread.start()
        self.ready = True

    # ---- public API -------------------------------------------------------------------------
    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
               sink: Callable[[RequestOutput | BaseException], None]) -> None:
        """Queue a request; `sink(item)` is then called on the calling thread's event loop with
        each output delta, the last one `finished`, or with the exception that ended the
        request. Errors found at once (bad prompt, id in use, queue full, dead engine) raise
        here instead. No task per request: the HTTP server's streams read their outputs
        straight from the sink."""
        self.engine.validate(prompt_token_ids, params)
        if request_id in self._streams:
            raise InvalidRequest(None, f"request id {request_id!r} is already in use")
        with self._lock:
            if self._stats["waiting"] + self._pending >= self.engine_config.max_waiting:
                raise QueueFullError(f"waiting queue is full ({self.engine_config.max_waiting} requests); "
                                     f"retry later")
            self._pending += 1
        self._streams[request_id] = (asyncio.get_running_loop(), sink)
        if self.error is not None:   # checked after registering: a dying engine either sees this stream or set this
            self._streams.pop(request_id, None)
            with self._lock:
                self._pending -= 1
            raise RuntimeError(f"engine stopped after an internal error: {self.error}")
        self._inbox.put(("add", request_id, list(prompt_token_ids), params))
        self._wake.set()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's output deltas as an async stream; leaving the loop early aborts it."""
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
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, float]:
        return {**self._stats, "idle_s": self._idle_s}

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- engine thread ----------------------------------------------------------------------
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
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, ids, params = msg
                with self._lock:
                    self._pending -= 1
                try:
                    eng.add_request(ids, params, request_id=rid, validate=False)   # (submit checked it)
                except (InvalidRequest, QueueFullError) as e:
                    self._deliver(rid, e)
            else:
                req = eng.abort(msg[1])
                if req is not None and req.finished:
                    self._emit(req)
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
