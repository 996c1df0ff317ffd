"""Token-budget scheduler over a fixed number of state slots. Plain Python: no tensors.

Every step: one decode token for each running sequence whose prompt is done, then prompt
chunks (running sequences still prefilling first, then newly admitted ones) until the
token budget is spent. A long prompt therefore delays running streams by at most one chunk.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from tnl.engine.request import Request, Status


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-waiting: the request is refused at once."""


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
class ScheduledBatch:
    decode: list[Request]                      # one token each
    prefill: list[tuple[Request, int]]         # (request, number of prompt tokens this step)
    new_slots: list[int]                       # slots handed out this step: their state must be zeroed

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, num_slots: int, max_num_batched_tokens: int, max_waiting: int):
        if max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        self.slots = SlotAllocator(num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._to_free: list[Request] = []

    # ---- queue -----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests); retry later")
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        """Mark finished; a running request's slot is released at the start of the next step."""
        if req.finished:
            return
        req.finish_reason = reason
        req.metrics.finished_time = time.monotonic()
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self._to_free.append(req)
        req.status = Status.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_free)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        for req in self._to_free:
            self.slots.free(req.slot)
        self._to_free.clear()

        budget = self.max_num_batched_tokens
        # a sequence whose token in flight (async scheduling) is its last one gets no more steps
        decode = [r for r in self.running
                  if r.prefill_done and not (r.in_flight and len(r.output_token_ids) + 1 >= r.params.max_tokens)]
        budget -= len(decode)
        prefill: list[tuple[Request, int]] = []
        for r in self.running:
            if budget <= 0:
                break
            if not r.prefill_done:
                n = min(r.num_prompt - r.num_computed, budget)
                prefill.append((r, n))
                budget -= n
        new_slots = []
        while self.waiting and budget > 0 and self.slots.num_free:
            r = self.waiting.popleft()
            r.slot = self.slots.alloc()
            r.status = Status.RUNNING
            new_slots.append(r.slot)
            self.running.append(r)
            n = min(r.num_prompt, budget)
            prefill.append((r, n))
            budget -= n
        return ScheduledBatch(decode, prefill, new_slots)

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "slots_used": self.slots.num_slots - self.slots.num_free,
                "slots_total": self.slots.num_slots}
