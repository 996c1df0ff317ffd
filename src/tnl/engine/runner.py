"""Runs scheduled batches on the model: packs tokens, owns the state pool, replays CUDA graphs
for decode-only steps (static buffers, bucketed batch sizes)."""
from __future__ import annotations

import logging
import time

import torch

from tnl.engine.request import Request
from tnl.engine.scheduler import ScheduledBatch
from tnl.model.transnormer import AttnBatch, TransnormerForCausalLM

log = logging.getLogger(__name__)


class StatePool:
    """The fixed-size recurrent state of `num_slots` sequences: per layer [num_slots + 1, H, dk, dv]
    float32. Slot `num_slots` is a scratch slot that padded rows of a CUDA graph write into."""

    def __init__(self, model: TransnormerForCausalLM, num_slots: int, device: torch.device):
        self.num_slots = num_slots
        self.scratch = num_slots
        self.layers = model.new_state_pool(num_slots + 1, device)

    def zero(self, slots: list[int]) -> None:
        if slots:
            idx = torch.tensor(slots, device=self.layers[0].device)
            for t in self.layers:
                t.index_fill_(0, idx, 0.0)

    def copy(self, src: int, dst: int) -> None:
        """Fork a sequence's state into another slot (prefix sharing, n > 1 sampling)."""
        for t in self.layers:
            t[dst].copy_(t[src])

    def snapshot(self, slot: int) -> list[torch.Tensor]:
        """A copy of one slot's state (prompt caching, saved conversations)."""
        return [t[slot].clone() for t in self.layers]

    def restore(self, slot: int, state: list[torch.Tensor]) -> None:
        for t, s in zip(self.layers, state):
            t[slot].copy_(s)


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_bs + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_bs} | {max_bs})
    return sizes


class ModelRunner:
    def __init__(self, model: TransnormerForCausalLM, num_slots: int, device: torch.device,
                 cuda_graphs: bool = True):
        self.model = model
        self.device = device
        self.pool = StatePool(model, num_slots, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.use_graphs = cuda_graphs and device.type == "cuda"
        if self.use_graphs:
            self._capture(num_slots)

    # ---- CUDA graphs ------------------------------------------------------------------------
    def _decode_forward(self, bs: int) -> torch.Tensor:
        batch = AttnBatch(positions=self._pos[:bs], n_decode=bs, decode_slots=self._slots[:bs],
                          prefill_slots=self._slots[:0], cu_seqlens=self._slots[:1], cu_seqlens_list=[0])
        return self.model.logits(self.model(self._ids[:bs], batch, self.pool.layers))

    def _capture(self, max_bs: int) -> None:
        t0 = time.perf_counter()
        dev = self.device
        self._ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self._pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self._slots = torch.full((max_bs,), self.pool.scratch, dtype=torch.long, device=dev)
        self._host = torch.zeros(3, max_bs, dtype=torch.long).pin_memory()   # staged ids / positions / slots
        self._host_np = self._host.numpy()
        self._out: dict[int, torch.Tensor] = {}
        mempool = torch.cuda.graph_pool_handle()
        sizes = graph_batch_sizes(max_bs)
        with torch.inference_mode():
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(2):  # warm up (Triton autotune / compile) outside the capture
                    self._decode_forward(max_bs)
            torch.cuda.current_stream(dev).wait_stream(s)
            for bs in reversed(sizes):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=mempool):
                    self._out[bs] = self._decode_forward(bs)
                self.graphs[bs] = g
        self.pool.zero([self.pool.scratch])
        torch.cuda.synchronize(dev)
        log.info("captured %d CUDA graphs (batch sizes %s) in %.1f s", len(sizes), sizes, time.perf_counter() - t0)

    def _replay(self, decode: list[Request]) -> torch.Tensor:
        n = len(decode)
        bs = next(b for b in sorted(self.graphs) if b >= n)
        h = self._host_np
        h[0, :n] = [r.last_token() for r in decode]
        h[1, :n] = [r.num_tokens - 1 for r in decode]
        h[2, :n] = [r.slot for r in decode]
        h[0:2, n:bs] = 0
        h[2, n:bs] = self.pool.scratch
        # the previous step's copies finished before its tokens reached the host, so the
        # staging buffer is free to overwrite
        self._ids[:bs].copy_(self._host[0, :bs], non_blocking=True)
        self._pos[:bs].copy_(self._host[1, :bs], non_blocking=True)
        self._slots[:bs].copy_(self._host[2, :bs], non_blocking=True)
        self.graphs[bs].replay()
        return self._out[bs][:n]

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch):
        """Returns (logits [M, V] for the rows to sample, their requests, prompt_logits) where
        the rows are the decode requests then the requests whose prompt completes this step
        (and want tokens), and prompt_logits maps a request asking for prompt logprobs to the
        logits [n, V] of this chunk's positions."""
        self.pool.zero(batch.new_slots)
        decode = batch.decode
        if not batch.prefill and decode and self.use_graphs and len(decode) <= max(self.graphs):
            return self._replay(decode), list(decode), {}

        ids: list[int] = [r.last_token() for r in decode]
        prefill_spec = []
        for r, n in batch.prefill:
            ids.extend(r.prompt_token_ids[r.num_computed:r.num_computed + n])
            prefill_spec.append((r.slot, r.num_computed, n))
        attn = AttnBatch.build([(r.slot, r.num_tokens - 1) for r in decode], prefill_spec, self.device)
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), attn, self.pool.layers)

        rows = list(range(len(decode)))
        reqs = list(decode)
        prompt_logits = {}
        off = len(decode)
        for r, n in batch.prefill:
            if r.params.prompt_logprobs is not None:
                prompt_logits[r.request_id] = self.model.logits(hidden[off:off + n])
            if r.num_computed + n == r.num_prompt and r.params.max_tokens > 0:
                rows.append(off + n - 1)
                reqs.append(r)
            off += n
        logits = self.model.logits(hidden[rows]) if rows else hidden.new_zeros(0, 1)
        return logits, reqs, prompt_logits
