"""The engine: one loop owns the model. step() = schedule -> execute -> update.

`LLMEngine` is synchronous (used by `LLM.generate` and by the async front end's thread).
`AsyncEngine` runs an LLMEngine in a background thread and gives each request an async
stream of outputs (the HTTP server's view).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch

from tnl.config import EngineConfig, ModelConfig
from tnl.engine.request import CompletionOutput, Request, RequestOutput, Status
from tnl.engine.runner import ModelRunner
from tnl.engine.sampler import PendingSample, sample, top_logprobs
from tnl.engine.sampling_params import SamplingParams
from tnl.engine.scheduler import QueueFullError, ScheduledBatch, Scheduler
from tnl.model.transnormer import TransnormerForCausalLM

log = logging.getLogger(__name__)

CPU_DEFAULT_SLOTS = 16
COUNTERS = {"steps": 0, "prefill_steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "device_busy_s": 0.0,
            "prefill_step_busy_s": 0.0}
GPU_MAX_SLOTS = 512


def generation_stop_ids(model_dir: str | None) -> set[int]:
    """eos ids from generation_config.json (an int or a list), when the checkpoint has one."""
    if not model_dir:
        return set()
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", path)
        return set()
    if isinstance(eos, int):
        return {eos}
    return {e for e in eos or [] if isinstance(e, int)}


def derive_num_slots(cfg: ModelConfig, device: torch.device, requested: int | None,
                     max_num_batched_tokens: int) -> int:
    """--max-num-seqs, or on GPU as many state slots as 90% of free memory holds after a
    reserve for activations and logits of one full step (prompt-logprob logits of a whole
    chunk included)."""
    if requested is not None:
        if requested < 1:
            raise ValueError("max_num_seqs must be >= 1")
        return requested
    if device.type != "cuda":
        return CPU_DEFAULT_SLOTS
    free, _ = torch.cuda.mem_get_info(device)
    reserve = max_num_batched_tokens * (cfg.d_model * 2 * 12 + cfg.glu_dim * 2 * 3 + 4 * cfg.hidden_dim * 2) \
        + 2 * GPU_MAX_SLOTS * cfg.vocab_size * 4 + 2 * max_num_batched_tokens * cfg.vocab_size * 4 + (1 << 30)
    n = int((free * 0.9 - reserve) // cfg.state_bytes())
    if n < 1:
        raise RuntimeError(f"not enough GPU memory for one sequence's state ({cfg.state_bytes() / 1e6:.0f} MB) "
                           f"after the weights: {free / 1e9:.1f} GB free")
    return min(n, GPU_MAX_SLOTS)


class LLMEngine:
    def __init__(self, model: TransnormerForCausalLM, tokenizer=None, engine_config: EngineConfig | None = None,
                 extra_stop_ids: set[int] | None = None):
        self.model = model
        self.model_config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.device = model.head_weight.device
        ec = engine_config or EngineConfig()
        slots = derive_num_slots(self.model_config, self.device, ec.max_num_seqs, ec.max_num_batched_tokens)
        ec = ec.replace(max_num_seqs=slots, max_num_batched_tokens=max(ec.max_num_batched_tokens, slots))
        self.engine_config = ec
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)   # graph capture, events and Triton launches follow the current device
        self.runner = ModelRunner(model, slots, self.device, cuda_graphs=ec.cuda_graphs)
        self.scheduler = Scheduler(slots, ec.max_num_batched_tokens, ec.max_waiting)
        eos = self.model_config.eos_token_id
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids = ({eos} if eos is not None else set()) | set(extra_stop_ids or ())
        # Checkpoints may pad the embedding past the tokenizer's pieces; ids there cannot be
        # decoded, so they are never sampled.
        self.sample_vocab = self.model_config.vocab_size
        if tokenizer is not None and tokenizer.vocab_size < self.sample_vocab:
            log.warning("the model has %d token ids but the tokenizer only %d: ids >= %d are never sampled",
                        self.sample_vocab, tokenizer.vocab_size, tokenizer.vocab_size)
            self.sample_vocab = tokenizer.vocab_size
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.async_scheduling = ec.async_scheduling if ec.async_scheduling is not None else self.device.type == "cuda"
        self._in_flight: _Step | None = None
        # Cumulative counters for /metrics (engine.stats()): steps run (and those with prompt
        # tokens), prompt tokens and decode rows computed, and on CUDA the device time of the
        # steps (a timing event before and after each; read once they have passed, no sync).
        self.counters = dict(COUNTERS)
        self._timings: collections.deque = collections.deque()   # (start, end, has_prefill) not yet read
        self._timed = self.device.type == "cuda"
        if self.device.type == "cuda":
            self._warm_up()
        log.info("engine ready: %d state slots (%.1f MB each), token budget %d, device %s, async scheduling %s",
                 slots, self.model_config.state_bytes() / 1e6, ec.max_num_batched_tokens, self.device,
                 "on" if self.async_scheduling else "off")

    def _warm_up(self) -> None:
        """Two short requests through every kind of step (a variable-length prefill, a step that
        admits a prompt while another decodes, graph decode, sampling) so that the kernels'
        first compilations happen before the engine says it is ready, not in users' requests."""
        t0 = time.perf_counter()
        V = self.model_config.vocab_size
        sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        reqs = [self.add_request([(3 + i) % V for i in range(n)], sp, request_id=f"warm-up-{n}") for n in (37, 300)]
        budget = self.scheduler.max_num_batched_tokens
        self.scheduler.max_num_batched_tokens = 64   # the long prompt comes in chunks beside a decode
        try:
            while self.has_work:
                self.step()
        finally:
            self.scheduler.max_num_batched_tokens = budget
            for r in reqs:
                self.release(r.request_id)
            if self._timed:
                torch.cuda.synchronize(self.device)
            self._timings.clear()
            self.counters = dict(COUNTERS)
        log.info("warm-up requests done in %.1f s", time.perf_counter() - t0)

    # ---- requests ---------------------------------------------------------------------------
    def validate_prompt(self, ids: list[int]) -> None:
        if not isinstance(ids, list) or not ids:
            raise ValueError("prompt is empty: give at least one token")
        V = self.model_config.vocab_size
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V:
                raise ValueError(f"prompt token {i} is {t!r}: token ids must be integers in [0, {V})")
        limit = self.engine_config.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise ValueError(f"prompt has {len(ids)} tokens, more than the limit of {limit} (--max-prompt-tokens)")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None) -> Request:
        self.validate_prompt(prompt_token_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        V = self.model_config.vocab_size
        if any(t >= V for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {V})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint has none: use stop_token_ids")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        req = Request(request_id, list(prompt_token_ids), params, frozenset(stop_ids), prompt=prompt)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if params.logprobs is not None:
            req.output_logprobs = []
        if self.tokenizer is not None:
            from tnl.model.tokenizer import IncrementalDetokenizer
            req.detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=req.prompt_token_ids,
                                               skip_special_tokens=params.skip_special_tokens)
        self.scheduler.add(req)
        self.requests[request_id] = req
        return req

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            self.scheduler.finish(req, "abort")
        return req

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def stats(self) -> dict[str, float]:
        """Gauges (running, waiting, slots) and the cumulative counters (the device time of
        the last step or two may still be on its way)."""
        if self._timings:
            self._read_timings()
        return {**self.scheduler.stats(), **self.counters}

    def _read_timings(self) -> None:
        """Add the device time of launched steps whose end event has passed (in launch order)."""
        c = self.counters
        while self._timings and self._timings[0][1].query():
            start, end, prefill = self._timings.popleft()
            ms = start.elapsed_time(end)
            c["device_busy_s"] += ms / 1000
            if prefill:
                c["prefill_step_busy_s"] += ms / 1000

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Run one step. Returns the requests that got new output or finished.

        With async scheduling (CUDA), a decode-only step is queued on the device before the
        tokens of the step before it are read back: the host's work for step k (reading
        tokens, detokenizing, stop checks, handing outputs over, scheduling) overlaps the
        device's work for step k+1. A sequence that stops at step k has then also been run in
        step k+1; that token is dropped. Steps with prompt chunks or penalties (which need the
        previous tokens on the host) wait for the step in flight first."""
        touched: dict[str, Request] = {}
        if self._timings:
            self._read_timings()
        batch = self.scheduler.schedule()
        if batch and self._in_flight is not None and self._can_overlap(batch):
            launched = self._launch(batch, self._in_flight)
            self._complete(self._in_flight, touched)
            self._in_flight = launched
            return list(touched.values())
        if self._in_flight is not None:
            self._complete(self._in_flight, touched)
            self._in_flight = None
            batch.decode = [r for r in batch.decode if not r.finished]
        if batch:
            launched = self._launch(batch, None)
            if self._can_overlap(batch):
                self._in_flight = launched
            else:
                self._complete(launched, touched)
        return list(touched.values())

    def _can_overlap(self, batch: ScheduledBatch) -> bool:
        return self.async_scheduling and not batch.prefill and not any(r.params.needs_penalties for r in batch.decode)

    def _launch(self, batch: ScheduledBatch, prev: "_Step | None") -> "_Step":
        """Queue the batch's forward pass and sampling on the device; update the bookkeeping
        that does not need the sampled tokens."""
        now = time.monotonic()
        for r, _ in batch.prefill:
            if r.metrics.first_scheduled_time is None:
                r.metrics.first_scheduled_time = now
        start = None
        if self._timed:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        if prev is not None and prev.sample is not None:
            logits, reqs, prompt_logits = self.runner.execute(batch, prev.rows, prev.sample.token_ids)
        else:
            logits, reqs, prompt_logits = self.runner.execute(batch)
        done: list[Request] = []
        for r, n in batch.prefill:
            if r.request_id in prompt_logits:
                self._add_prompt_logprobs(r, prompt_logits[r.request_id], n)
            r.num_computed += n
            if r.prefill_done and r.params.max_tokens == 0:
                self.scheduler.finish(r, "length")
                done.append(r)
        for r in batch.decode:
            r.num_computed += 1
        c = self.counters
        c["steps"] += 1
        c["prefill_steps"] += bool(batch.prefill)
        c["prefill_tokens"] += sum(n for _, n in batch.prefill)
        c["decode_tokens"] += len(batch.decode)
        pending = None
        if reqs:
            if self.sample_vocab < logits.shape[-1]:
                logits[:, self.sample_vocab:] = float("-inf")
            pending = sample(logits, reqs).start_copy()
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._timings.append((start, end, bool(batch.prefill)))
        step = _Step(reqs, pending, done)
        for r in reqs:
            r.in_flight = step
        return step

    def _complete(self, step: "_Step", touched: dict[str, Request]) -> None:
        """Wait for a launched step's tokens and apply them."""
        for r in step.done:
            touched[r.request_id] = r
        if step.sample is None:
            return
        res = step.sample.resolve()
        now = time.monotonic()
        for i, r in enumerate(step.reqs):
            if r.in_flight is step:   # (not when a newer step, launched before this one was read, holds it)
                r.in_flight = None
            if r.finished:   # stopped or aborted while this step ran: its token is dropped
                continue
            self._append_token(r, res.token_ids[i], res.logprobs[i], res.sampled_logprob[i], now)
            touched[r.request_id] = r

    def _add_prompt_logprobs(self, r: Request, logits: torch.Tensor, n: int) -> None:
        """logits [n, V] at positions num_computed..+n-1 predict the prompt tokens after them."""
        if r.prompt_logprobs is None:
            r.prompt_logprobs = [None]
        start = r.num_computed
        nxt = r.prompt_token_ids[start + 1:start + n + 1]
        if not nxt:
            return
        lp = torch.log_softmax(logits[:len(nxt)].float(), dim=-1)
        target = torch.tensor(nxt, device=lp.device)
        r.prompt_logprobs.extend(top_logprobs(lp, target, r.params.prompt_logprobs))

    def _append_token(self, r: Request, tok: int, lp: dict | None, sampled_lp: float, now: float) -> None:
        r.output_token_ids.append(tok)
        if sampled_lp is not None:
            r.cumulative_logprob += sampled_lp
        if r.output_logprobs is not None:
            r.output_logprobs.append(lp)
        if r.metrics.first_token_time is None:
            r.metrics.first_token_time = now
        r.metrics.last_token_time = now
        p = r.params
        reason = None
        if tok in r.stop_ids:
            reason, r.stop_reason = "stop", tok
        elif len(r.output_token_ids) >= p.max_tokens:
            reason = "length"
        if r.detok is not None:
            before = len(r.text)
            if reason != "stop" or tok not in r.stop_ids:
                r.text += r.detok.add(tok)
            if reason is not None:
                r.text += r.detok.flush()
            for s in p.stop:
                i = r.text.find(s, max(0, before - len(s) + 1))
                if i >= 0:
                    r.text = r.text[:i]
                    reason, r.stop_reason = "stop", s
                    break
        if reason is not None:
            self.scheduler.finish(r, reason)

    # ---- outputs ----------------------------------------------------------------------------
    @staticmethod
    def _safe_text_end(r: Request) -> int:
        """How much of r.text may be shown: hold back a tail that could begin a stop string."""
        if r.finished or not r.params.stop:
            return len(r.text)
        hold = 0
        for s in r.params.stop:
            for k in range(min(len(s) - 1, len(r.text)), hold, -1):
                if r.text.endswith(s[:k]):
                    hold = k
                    break
        return len(r.text) - hold

    def take_delta(self, r: Request, sent_tokens: int, first: bool) -> RequestOutput:
        """Output since `sent_tokens` tokens and `r.emitted` characters were handed out."""
        end = self._safe_text_end(r)
        text = r.text[r.emitted:end]
        r.emitted = max(r.emitted, end)
        lps = r.output_logprobs[sent_tokens:] if r.output_logprobs is not None else None
        out = CompletionOutput(0, text, r.output_token_ids[sent_tokens:], lps,
                               r.finish_reason if r.finished else None,
                               r.reported_cumulative_logprob, r.stop_reason)
        return RequestOutput(r.request_id, r.prompt, r.prompt_token_ids,
                             r.prompt_logprobs if first else None, [out], r.finished, r.metrics,
                             r.num_prompt, len(r.output_token_ids))

    def final_output(self, r: Request) -> RequestOutput:
        out = CompletionOutput(0, r.text, list(r.output_token_ids), r.output_logprobs, r.finish_reason,
                               r.reported_cumulative_logprob, r.stop_reason)
        return RequestOutput(r.request_id, r.prompt, r.prompt_token_ids, r.prompt_logprobs, [out], True,
                             r.metrics, r.num_prompt, len(r.output_token_ids))

    def release(self, request_id: str) -> None:
        self.requests.pop(request_id, None)


class _Step:
    """A launched step: the requests of its sampled rows (row i = reqs[i]), their tokens still
    on the device, and requests it finished without sampling (max_tokens 0)."""

    __slots__ = ("reqs", "sample", "done", "rows")

    def __init__(self, reqs: list[Request], sample: PendingSample | None, done: list[Request]):
        self.reqs, self.sample, self.done = reqs, sample, done
        self.rows = {id(r): i for i, r in enumerate(reqs)}


def _put_all(items: list) -> None:
    for sink, item in items:
        sink(item)


class AsyncEngine:
    """An LLMEngine driven by a background thread; each request gets an async output stream."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.engine_config = engine.engine_config
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Callable, list]] = {}
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

    @classmethod
    def from_pretrained(cls, model: str, device: str = "auto", dtype: str = "auto",
                        engine_config: EngineConfig | None = None, chat_template_file: str | None = None,
                        **kw) -> "AsyncEngine":
        from tnl.entrypoints import build_engine
        return cls(build_engine(model, device=device, dtype=dtype, engine_config=engine_config,
                                chat_template_file=chat_template_file, **kw))

    # ---- public API -------------------------------------------------------------------------
    def submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
               sink: Callable[[RequestOutput | BaseException], None]) -> None:
        """Queue a request; `sink(item)` is then called on the calling thread's event loop with
        each output delta, the last one `finished`, or with the exception that ended the
        request. Errors found at once (bad prompt, id in use, queue full, dead engine) raise
        here instead. No task per request: the HTTP server's streams read their outputs
        straight from the sink."""
        self.engine.validate_prompt(prompt_token_ids)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        with self._lock:
            if self._stats["waiting"] + self._pending >= self.engine_config.max_waiting:
                raise QueueFullError(f"waiting queue is full ({self.engine_config.max_waiting} requests); "
                                     f"retry later")
            self._pending += 1
        self._streams[request_id] = (asyncio.get_running_loop(), sink, [0, True])
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
            loop, sink, _ = entry
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
                    eng.add_request(ids, params, request_id=rid)
                except (ValueError, QueueFullError) as e:
                    self._deliver(rid, e)
            else:
                req = eng.abort(msg[1])
                if req is not None and req.finished:
                    self._emit(req)
            self._stats = eng.stats()

    def _emit(self, req: Request) -> None:
        entry = self._streams.get(req.request_id)
        if entry is not None:
            state = entry[2]
            out = self.engine.take_delta(req, state[0], state[1])
            state[0], state[1] = len(req.output_token_ids), False
            if out.outputs[0].token_ids or out.outputs[0].text or out.finished or out.prompt_logprobs:
                self._deliver(req.request_id, out)
        if req.finished:
            self.engine.release(req.request_id)

    def _loop(self) -> None:
        eng = self.engine
        if eng.device.type == "cuda":
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
