"""Runs scheduled batches on the model: packs tokens, owns the state pool, replays CUDA graphs
for decode-only steps (static buffers, bucketed batch sizes)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tnl.engine.request import Request
from tnl.engine.scheduler import SchedulerOutput
from tnl.model.transnormer import AttnBatch, TransnormerForCausalLM, to_device

log = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    """One step's results on the device: logits [M, V] float32 of the rows to sample (row i is
    reqs[i]: the decode requests, then those whose prompt completes this step and want tokens),
    and, per request id asking for prompt logprobs, the logits [n, V] of its chunk's positions."""

    logits: torch.Tensor
    reqs: list[Request]
    prompt_logits: dict[str, torch.Tensor]


class StatePool:
    """The fixed-size recurrent state of `num_slots` sequences: per layer [num_slots + 1, H, dk, dv]
    in `dtype` (float32, or bfloat16 / float16: EngineConfig.state_dtype). Slot `num_slots` is a
    scratch slot that padded rows of a CUDA graph write into. Snapshots are in the pool's dtype."""

    def __init__(self, model: TransnormerForCausalLM, num_slots: int, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.num_slots = num_slots
        self.scratch = num_slots
        self.dtype = dtype
        self.layers = model.new_state_pool(num_slots + 1, device, dtype)

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

    def snapshot_many(self, slots: list[int]) -> list[list[torch.Tensor]]:
        """snapshot() of several slots with one copy per layer: per slot, per layer a view
        [H, dk, dv] into that layer's copy [len(slots), H, dk, dv]."""
        idx = torch.tensor(slots, device=self.layers[0].device)
        copies = [t.index_select(0, idx) for t in self.layers]
        return [list(views) for views in zip(*(c.unbind(0) for c in copies))]

    def restore_many(self, slots: list[int], states: list[list[torch.Tensor]]) -> None:
        """restore() of several slots, two copies per layer."""
        if len(slots) == 1:
            return self.restore(slots[0], states[0])
        idx = torch.tensor(slots, device=self.layers[0].device)
        for i, t in enumerate(self.layers):
            t.index_copy_(0, idx, torch.stack([s[i] for s in states]))

    def restore(self, slot: int, state: list[torch.Tensor]) -> None:
        for t, s in zip(self.layers, state):
            t[slot].copy_(s)


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_bs + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_bs} | {max_bs})
    return sizes


class ModelRunner:
    def __init__(self, model: TransnormerForCausalLM, num_slots: int, device: torch.device,
                 cuda_graphs: bool = True, state_dtype: torch.dtype = torch.float32):
        self.model = model
        self.device = device
        self.pool = StatePool(model, num_slots, device, state_dtype)
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
        self._src = torch.full((max_bs,), -1, dtype=torch.long, device=dev)
        # staged ids / positions / slots / in-flight rows, two buffers used in turn
        self._host = [torch.zeros(4, max_bs, dtype=torch.long).pin_memory() for _ in range(2)]
        self._flip = 0
        self._out: dict[int, torch.Tensor] = {}
        mempool = torch.cuda.graph_pool_handle()
        sizes = graph_batch_sizes(max_bs)
        self.model.backend.precompile(self.model.config, self.model.head_weight.dtype, sizes)
        with torch.inference_mode():
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                # warm up outside the capture at every size: each size may launch its own
                # kernels (Triton configs differ by row count), compiled and loaded here
                for bs in [max_bs] + sizes:
                    self._decode_forward(bs)
            torch.cuda.current_stream(dev).wait_stream(s)
            for bs in reversed(sizes):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=mempool):
                    self._out[bs] = self._decode_forward(bs)
                self.graphs[bs] = g
        self.pool.zero([self.pool.scratch])
        torch.cuda.synchronize(dev)
        log.info("captured %d CUDA graphs (batch sizes %s) in %.1f s", len(sizes), sizes, time.perf_counter() - t0)

    def _replay(self, decode: list[Request], host_ids: list[int], src: list[int] | None,
                prev_tokens: torch.Tensor | None) -> torch.Tensor:
        n = len(decode)
        bs = next(b for b in sorted(self.graphs) if b >= n)
        # Two staging buffers used in turn: with one step in flight, the buffer written now was
        # last read by the step before it, which the host has already waited for.
        self._flip ^= 1
        host = self._host[self._flip]
        h = host.numpy()
        h[0, :n] = host_ids
        h[1, :n] = [r.num_computed for r in decode]
        h[2, :n] = [r.slot for r in decode]
        h[0:2, n:bs] = 0
        h[2, n:bs] = self.pool.scratch
        self._ids[:bs].copy_(host[0, :bs], non_blocking=True)
        self._pos[:bs].copy_(host[1, :bs], non_blocking=True)
        self._slots[:bs].copy_(host[2, :bs], non_blocking=True)
        if src is not None:
            h[3, :n] = src
            h[3, n:bs] = -1
            self._src[:bs].copy_(host[3, :bs], non_blocking=True)
            _take_in_flight(self._ids[:bs], self._src[:bs], prev_tokens)
        self.graphs[bs].replay()
        return self._out[bs][:n]

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, in_flight: dict[int, int] | None = None,
                prev_tokens: torch.Tensor | None = None) -> ModelOutput:
        """Run one step's forward pass (see ModelOutput for what comes back).

        A decode request whose last token is still on the device (sampled by the step in
        flight) has `in_flight[id(request)]` = its row in `prev_tokens`: its input id is taken
        from there on the device, so this step is queued without waiting for that one.

        A new request with a prompt-state cache hit starts from a copy of the snapshot (never the
        snapshot itself, which other requests may take too); a whole-prompt hit's row of the
        logits is the snapshot's (no forward pass for it)."""
        hits = {r.slot: r.cache_hit.state for r, _ in batch.prefill if r.cache_hit is not None}
        hits.update((r.slot, r.cache_hit.state) for r in batch.cached)
        self.pool.zero([s for s in batch.new_slots if s not in hits])
        if hits:
            self.pool.restore_many(list(hits), list(hits.values()))
        cached_logits = [r.cache_hit.logits for r in batch.cached]
        for r, _ in batch.prefill:
            r.cache_hit = None
        for r in batch.cached:
            r.cache_hit = None
        decode = batch.decode
        host_ids: list[int] = []
        src: list[int] | None = None
        for i, r in enumerate(decode):
            row = in_flight.get(id(r)) if in_flight else None
            if row is None:
                host_ids.append(r.last_token())
            else:
                host_ids.append(0)
                if src is None:
                    src = [-1] * len(decode)
                src[i] = row
        graph_decode = bool(decode) and self.use_graphs and len(decode) <= max(self.graphs)
        if graph_decode and not batch.prefill:
            logits = self._replay(decode, host_ids, src, prev_tokens)
            return ModelOutput(_with_rows(logits, cached_logits), list(decode) + list(batch.cached), {})
        if not decode and not batch.prefill:   # only whole-prompt hits
            return ModelOutput(torch.stack(cached_logits), list(batch.cached), {})
        decode_logits = None
        if graph_decode:
            # decode rows through their CUDA graph, the prompt chunks eagerly after them (each
            # sequence has its own state slot, so the two passes are independent); this keeps
            # running streams at graph speed while new prompts are admitted
            decode_logits = self._replay(decode, host_ids, src, prev_tokens)
            eager_decode, host_ids, src = [], [], None
        else:
            eager_decode = decode

        prefill_spec = []
        for r, n in batch.prefill:
            host_ids.extend(r.prompt_token_ids[r.num_computed:r.num_computed + n])
            prefill_spec.append((r.slot, r.num_computed, n))
        attn = AttnBatch.build([(r.slot, r.num_computed) for r in eager_decode], prefill_spec, self.device)
        ids = to_device(host_ids, torch.long, self.device)
        if src is not None:
            src_t = to_device(src + [-1] * (len(host_ids) - len(src)), torch.long, self.device)
            _take_in_flight(ids, src_t, prev_tokens)
        hidden = self.model(ids, attn, self.pool.layers)

        rows = list(range(len(eager_decode)))
        reqs = list(decode)
        prompt_logits = {}
        off = len(eager_decode)
        for r, n in batch.prefill:
            if r.params.prompt_logprobs is not None:
                prompt_logits[r.request_id] = self.model.logits(hidden[off:off + n])
            if r.num_computed + n == r.num_prompt and r.params.max_tokens > 0:
                rows.append(off + n - 1)
                reqs.append(r)
            off += n
        logits = self.model.logits(hidden.index_select(0, to_device(rows, torch.long, self.device))) if rows \
            else hidden.new_zeros(0, 1)
        if decode_logits is not None:
            logits = torch.cat([decode_logits, logits]) if rows else decode_logits
        return ModelOutput(_with_rows(logits, cached_logits), reqs + list(batch.cached), prompt_logits)


def _with_rows(logits: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
    """logits [M, V] with the rows `extra` ([V] each) after them (a fresh tensor: the sampler
    writes into its logits, and a cached row must stay as it was)."""
    if not extra:
        return logits
    return torch.cat([logits, torch.stack(extra).to(logits.dtype)]) if logits.shape[0] else torch.stack(extra)


def _take_in_flight(ids: torch.Tensor, src: torch.Tensor, prev_tokens: torch.Tensor) -> None:
    """ids[i] = prev_tokens[src[i]] where src[i] >= 0, on the device (no host sync)."""
    taken = prev_tokens.index_select(0, src.clamp(min=0, max=prev_tokens.shape[0] - 1))
    torch.where(src >= 0, taken, ids, out=ids)
