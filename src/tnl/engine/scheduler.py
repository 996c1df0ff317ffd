"""Token-budget scheduler over a fixed number of state slots. Plain Python: no tensors.

Every step: one decode token for each running sequence whose prompt is done, then prompt
chunks (running sequences still prefilling first, then newly admitted ones) until the
token budget is spent. A long prompt therefore delays running streams by at most one chunk.

The scheduler owns each request's progress: `advance` counts the tokens a launched step puts
into the state, `update_from_output` appends the sampled tokens and applies stop ids and
max_tokens, and `finish` releases the slot (at the start of the next step, so a step still
on the device never sees its slot reused).

The prompt-state cache (tnl.engine.prefix_cache) plugs in at two places. Admission in
`schedule` looks up the longest cached prefix of a new request's prompt: the runner copies
that snapshot into the slot and `num_computed` starts after it (a whole-prompt hit samples
its first token from the snapshot's logits). Prompt chunks stop exactly at the request's
boundaries, and `advance` lists the (request, length) snapshots that the step made possible;
`finish` lists the end of a finished generation. A request whose prompt another running
request is prefilling right now waits for that one's snapshot instead of computing the
same prompt again (n > 1 samples of one prompt: one prefill, then n copies).
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tnl.engine.errors import QueueFullError
from tnl.engine.prefix_cache import CacheEntry, PrefixCache
from tnl.engine.request import Request, Status

__all__ = ["QueueFullError", "SlotAllocator", "SchedulerOutput", "Scheduler"]


class SlotAllocator:
    """Slots 0..n-1 of the state pool. Freed slots are handed out again lowest first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        return self._free.pop()

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} freed twice"
        self._free.append(slot)
        self._free.sort(reverse=True)


@dataclass
class SchedulerOutput:
    """One step's work, for the runner."""

    decode: list[Request]                      # one token each
    prefill: list[tuple[Request, int]]         # (request, number of prompt tokens this step)
    new_slots: list[int]                       # slots handed out this step: zeroed, or set from a cache hit
    cached: list[Request] = field(default_factory=list)   # whole-prompt hits: first token from cached logits

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def sampled(self) -> list[Request]:
        """The requests that get a token from this step, in the runner's row order: every decode
        row, then each request whose prompt completes here and that wants tokens."""
        done = [r for r, n in self.prefill if r.num_computed + n == r.num_prompt and r.params.max_tokens > 0]
        return self.decode + done + self.cached

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill or self.cached)


class Scheduler:
    """prefill_wave_s: while sequences decode, new prompts are admitted in waves: only once the
    waiting ones would fill the free slots or the step's token budget, or the oldest has waited
    this long (0: at once). A step that carries prompts costs a fixed ~30 ms beside the decode
    graph (7B, H200: its eager pass is host-bound), so 64 requests trickling in over a few
    milliseconds cost 27 such steps one at a time and a handful in waves (BENCHMARKS.md). An idle
    engine admits at once. `clock` is time.monotonic (the requests' arrival clock)."""

    def __init__(self, num_slots: int, max_num_batched_tokens: int, max_waiting: int,
                 prefix_cache: PrefixCache | None = None, prefill_wave_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        self.prefix_cache = prefix_cache
        self._prefilling: dict[tuple[int, ...], Request] = {}   # prompt -> the request computing it now
        self.snapshots: list[tuple[Request, int]] = []   # (request, tokens of prompt + output) to keep
        self.slots = SlotAllocator(num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._to_free: list[Request] = []
        # called with each request given a slot (the async front counts its waiting queue so,
        # whatever order the cache lets requests in)
        self.on_admit: Callable[[Request], None] | None = None
        self.prefill_wave_s = prefill_wave_s
        self.clock = clock
        self.waves_deferred = 0      # steps that left waiting prompts for the next wave

    # ---- queue -----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests); retry later")
        self.waiting.append(req)

    def finish(self, req: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark finished; a running request's slot is released at the start of the next step.
        A stop string found in the text of a request that its last token also finished by
        length still makes it a "stop" (as the text shows)."""
        if req.finished:
            if reason == "stop" and stop_reason is not None:
                req.finish_reason, req.stop_reason = reason, stop_reason
            return
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.metrics.finished_time = time.monotonic()
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self._to_free.append(req)
            self._stop_prefilling(req)
            if self.prefix_cache is not None and reason != "abort" and req.prefill_done:
                self.snapshots.append((req, req.num_computed))   # the end of the generation
        req.status = Status.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_free)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        for req in self._to_free:
            self.slots.free(req.slot)
        self._to_free.clear()

        budget = self.max_num_batched_tokens
        # a sequence whose token in flight (async scheduling) is its last one gets no more steps
        decode = [r for r in self.running
                  if r.prefill_done and len(r.output_token_ids) + r.num_in_flight < r.params.max_tokens]
        budget -= len(decode)
        prefill: list[tuple[Request, int]] = []
        for r in self.running:
            if budget <= 0:
                break
            if not r.prefill_done:
                n = self._chunk(r, budget)
                prefill.append((r, n))
                budget -= n
        new_slots, cached, skipped = [], [], []
        if decode and self.waiting and self.prefill_wave_s > 0 and not self._wave_ready(budget):
            self.waves_deferred += 1
            return SchedulerOutput(decode, prefill, new_slots, cached)
        while self.waiting and budget > 0 and self.slots.num_free:
            r = self.waiting.popleft()
            if self.prefix_cache is not None and r.prompt_key in self._prefilling:
                skipped.append(r)   # its prompt is being computed: wait for that snapshot
                continue
            r.slot = self.slots.alloc()
            r.status = Status.RUNNING
            if self.on_admit is not None:
                self.on_admit(r)
            new_slots.append(r.slot)
            self.running.append(r)
            if self.prefix_cache is not None:
                self._admit_from_cache(r)
            if r.prefill_done:
                cached.append(r)
                continue
            n = self._chunk(r, budget)
            prefill.append((r, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return SchedulerOutput(decode, prefill, new_slots, cached)

    def _wave_ready(self, budget: int) -> bool:
        """Whether the waiting prompts make a wave now (see the class docstring)."""
        free = self.slots.num_free
        if not free or budget <= 0:
            return True        # nothing can be admitted anyway: no deferral to count
        if len(self.waiting) >= free or self.clock() - self.waiting[0].metrics.arrival_time >= self.prefill_wave_s:
            return True
        tokens = 0
        for r in self.waiting:
            tokens += r.num_prompt - r.num_computed
            if tokens >= budget:
                return True
        return False

    # ---- prompt-state cache ------------------------------------------------------------------
    def _chunk(self, r: Request, budget: int) -> int:
        """Prompt tokens of r for this step: up to the budget, stopping at its next boundary."""
        end = r.num_prompt
        for b in r.boundaries:
            if b > r.num_computed:
                end = b
                break
        return min(end - r.num_computed, budget)

    def _admit_from_cache(self, r: Request) -> None:
        """Start r after the longest cached prefix of its prompt (prompt logprobs need every
        position computed: no lookup then), and keep only the boundaries not yet cached."""
        cache, L = self.prefix_cache, r.num_prompt
        hit: CacheEntry | None = None
        if r.params.prompt_logprobs is None and r.params.max_tokens > 0:
            # a hit on the whole prompt needs the logits after it; a shorter one leaves a token to compute
            hit = cache.lookup(r.prompt_token_ids, lambda e: e.num_tokens < L or e.logits is not None)
            cache.record_query(L, hit, hit.num_tokens if hit else 0)
        if hit is not None:
            r.cache_hit, r.num_cached = hit, hit.num_tokens
            r.num_computed = hit.num_tokens
        wanted = []
        for b in r.boundaries:
            if b <= r.num_computed:
                continue
            e = cache.get(r.prompt_token_ids[:b])
            if e is None or (b == L and e.logits is None):
                wanted.append(b)
        r.boundaries = wanted
        if L in wanted:
            self._prefilling.setdefault(r.prompt_key, r)

    def _stop_prefilling(self, r: Request) -> None:
        key = r.prompt_key
        if self._prefilling.get(key) is r:
            del self._prefilling[key]

    def advance(self, out: SchedulerOutput, now: float) -> list[Request]:
        """A step was launched: its tokens are in the state. Returns the requests it finished
        without sampling (a prompt scored with max_tokens 0)."""
        for r in out.sampled():   # (before num_computed moves: which prompts complete in this step)
            r.num_in_flight += 1
        done = []
        for r, n in out.prefill:
            if r.metrics.first_scheduled_time is None:
                r.metrics.first_scheduled_time = now
            r.num_computed += n
            if r.prefill_done and r.params.max_tokens == 0:
                self.finish(r, "length")
                done.append(r)
        for r in out.decode:
            r.num_computed += 1
        if self.prefix_cache is not None:
            for r, _ in out.prefill:
                if r.num_computed in r.boundaries:
                    self.snapshots.append((r, r.num_computed))
                if r.prefill_done:
                    self._stop_prefilling(r)
        return done

    def update_from_output(self, reqs: list[Request], token_ids: list[int], logprobs: list[dict | None],
                           sampled_logprobs: list[float | None], now: float) -> list[Request]:
        """The sampled tokens of a launched step (row i belongs to reqs[i]): append them, and
        finish on a stop id or at max_tokens. A request that finished while the step ran (a
        stop string, an abort) drops its token. Returns the requests that got a token."""
        got = []
        for r, tok, lp, slp in zip(reqs, token_ids, logprobs, sampled_logprobs):
            r.num_in_flight -= 1
            if r.finished:
                continue
            r.output_token_ids.append(tok)
            if slp is not None:
                r.cumulative_logprob += slp
            if r.output_logprobs is not None:
                r.output_logprobs.append(lp)
            if r.metrics.first_token_time is None:
                r.metrics.first_token_time = now
            r.metrics.last_token_time = now
            if tok in r.stop_ids:
                self.finish(r, "stop", tok)
            elif len(r.output_token_ids) >= r.params.max_tokens:
                self.finish(r, "length")
            got.append(r)
        return got

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "slots_used": self.slots.num_slots - self.slots.num_free,
                "slots_total": self.slots.num_slots}
