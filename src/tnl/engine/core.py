"""The token engine: one loop owns the model. step() = schedule -> execute -> update.

Token ids in, token ids and logprobs out: no text here (that is tnl.engine.output). The
scheduler decides each step's work and owns request progress, the runner runs it on the
model, the sampler picks tokens on the device.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

import torch

from tnl.config import PREFILL_WAVE_MS_CUDA, EngineConfig, ModelConfig
from tnl.engine import state_file
from tnl.engine.prefix_cache import CacheEntry, PrefixCache
from tnl.engine.request import Request
from tnl.engine.runner import ModelRunner
from tnl.engine.sampler import PendingSample, sample, top_logprobs
from tnl.engine.sampling_params import SamplingParams
from tnl.engine.scheduler import Scheduler, SchedulerOutput
from tnl.engine.structured import GrammarMasks
from tnl.model.transnormer import TransnormerForCausalLM

log = logging.getLogger(__name__)

CPU_DEFAULT_SLOTS = 16
CPU_PREFIX_CACHE_BYTES = 10**9   # "1 GB" on CPU
COUNTERS = {"steps": 0, "prefill_steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "device_busy_s": 0.0,
            "prefill_step_busy_s": 0.0}
GPU_MAX_SLOTS = 512


def derive_num_slots(cfg: ModelConfig, device: torch.device, requested: int | None,
                     max_num_batched_tokens: int, state_dtype: str = "float32") -> int:
    """--max-num-seqs, or on GPU as many state slots as 90% of free memory holds after a
    reserve for one full step: activations [tokens, d] of the layer matmuls (qkvu, GLU halves,
    bf16), the sampled rows' logits [GPU_MAX_SLOTS, V] float32 twice (raw and filtered), a whole
    chunk's prompt-logprob logits [tokens, V] float32 twice, and 1 GB for the allocator. A slot
    is one sequence's state in `state_dtype`: a 16-bit state gives twice the slots."""
    if requested is not None:
        if requested < 1:
            raise ValueError("max_num_seqs must be >= 1")
        return requested
    if device.type != "cuda":
        return CPU_DEFAULT_SLOTS
    free, _ = torch.cuda.mem_get_info(device)
    reserve = max_num_batched_tokens * (cfg.d_model * 2 * 12 + cfg.glu_dim * 2 * 3 + 4 * cfg.hidden_dim * 2) \
        + 2 * GPU_MAX_SLOTS * cfg.vocab_size * 4 + 2 * max_num_batched_tokens * cfg.vocab_size * 4 + (1 << 30)
    per_slot = cfg.state_bytes(state_dtype)
    n = int((free * 0.9 - reserve) // per_slot)
    if n < 1:
        raise RuntimeError(f"not enough GPU memory for one sequence's state ({per_slot / 1e6:.0f} MB) "
                           f"after the weights: {free / 1e9:.1f} GB free")
    return min(n, GPU_MAX_SLOTS)


class _Step:
    """A launched step: the requests of its sampled rows (row i = reqs[i]), their tokens still
    on the device, and requests it finished without sampling (max_tokens 0)."""

    __slots__ = ("reqs", "sample", "done", "rows")

    def __init__(self, reqs: list[Request], sample: PendingSample | None, done: list[Request]):
        self.reqs, self.sample, self.done = reqs, sample, done
        self.rows = {id(r): i for i, r in enumerate(reqs)}


class EngineCore:
    """Requests are added already validated (tnl.engine.llm_engine.LLMEngine checks them)."""

    def __init__(self, model: TransnormerForCausalLM, engine_config: EngineConfig, stop_ids: set[int],
                 sample_vocab: int):
        self.model = model
        self.model_config: ModelConfig = model.config
        self.device = model.head_weight.device
        ec = engine_config
        slots = derive_num_slots(self.model_config, self.device, ec.max_num_seqs, ec.max_num_batched_tokens,
                                 ec.state_dtype)
        self.engine_config = ec = dataclasses.replace(
            ec, max_num_seqs=slots, max_num_batched_tokens=max(ec.max_num_batched_tokens, slots))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)   # graph capture, events and Triton launches follow the current device
        self.state_dtype: torch.dtype = getattr(torch, ec.state_dtype)   # the pool's, the snapshots' and imports'
        if ec.state_dtype == "float16":
            # the slowest-decaying heads (decay between 1 - 2.5e-6 and 1 - 2e-7) sum k v over the whole past
            log.warning("state dtype float16: states of long sequences overflow it (inf/NaN from about 3k tokens on "
                        "the demo model, benchmarks/accuracy.py); bfloat16 has float32's range")
        self.runner = ModelRunner(model, slots, self.device, cuda_graphs=ec.cuda_graphs, state_dtype=self.state_dtype)
        self.prefix_cache = self._new_prefix_cache(ec)
        self.fingerprint = state_file.model_fingerprint(model)   # names the model in state files
        self.state_dir = self._open_state_dir(ec)
        wave_ms = ec.prefill_wave_ms if ec.prefill_wave_ms is not None else \
            PREFILL_WAVE_MS_CUDA if self.device.type == "cuda" else 0.0
        self.scheduler = Scheduler(slots, ec.max_num_batched_tokens, ec.max_waiting, self.prefix_cache,
                                   prefill_wave_s=wave_ms / 1000)
        self.stop_ids = frozenset(stop_ids)    # eos and generation_config's ids (unless ignore_eos)
        self.sample_vocab = sample_vocab       # ids >= this are never sampled (the tokenizer cannot decode them)
        self.async_scheduling = ec.async_scheduling if ec.async_scheduling is not None else self.device.type == "cuda"
        self._in_flight: _Step | None = None
        # Cumulative counters for /metrics (stats()): steps run (and those with prompt tokens),
        # prompt tokens and decode rows computed, and on CUDA the device time of the steps (a
        # timing event before and after each; read once they have passed, no sync).
        self.counters = dict(COUNTERS)
        self._timings: collections.deque = collections.deque()   # (start, end, has_prefill) not yet read
        self._timed = self.device.type == "cuda"
        self._masks: GrammarMasks | None = None   # structured output's bitmasks, from the first constrained row

    def _new_prefix_cache(self, ec: EngineConfig) -> PrefixCache | None:
        if not ec.enable_prefix_caching:
            log.info("prompt-state cache off")
            return None
        if ec.prefix_cache_gb is not None:
            budget = int(ec.prefix_cache_gb * 1e9)
        elif self.device.type == "cuda":   # half of what the slots and the step's reserve left free
            budget = int(0.5 * torch.cuda.mem_get_info(self.device)[0])
        else:
            budget = CPU_PREFIX_CACHE_BYTES
        per = self.entry_bytes()
        log.info("prompt-state cache: %.2f GB in %s memory (%d snapshots of %.1f MB)", budget / 1e9,
                 "GPU" if self.device.type == "cuda" else "host", budget // per, per / 1e6)
        return PrefixCache(budget)

    def _open_state_dir(self, ec: EngineConfig) -> state_file.StateDirectory | None:
        """--prefix-cache-dir: the snapshots are also written there, and those of this model
        found there now are loaded into the cache, the newest first, as many as its budget holds
        (the others stay on disk). Eager rather than on a hit: a hit is then a copy in device
        memory, never a file read inside a step that every running stream waits for (a 7B state
        is 65 MB); the cost is paid once here, before the engine serves, and the directory's cap
        bounds it."""
        if ec.prefix_cache_dir is None:
            return None
        if self.prefix_cache is None:
            log.warning("--prefix-cache-dir %s ignored: the prompt-state cache is off", ec.prefix_cache_dir)
            return None
        t0 = time.perf_counter()
        d = state_file.StateDirectory(ec.prefix_cache_dir, int(ec.prefix_cache_dir_gb * 1e9), self.fingerprint,
                                      self.model_config)
        found = d.scan()
        per = self.entry_bytes()
        fit = found[:self.prefix_cache.budget_bytes // per]
        loaded = 0
        for path, _ in reversed(fit):   # oldest first, so that the newest are the most recently used
            try:
                ids, state, logits = d.read(path)
            except (state_file.StateFileError, OSError) as e:
                log.warning("--prefix-cache-dir: skipping %s: %s", path, e)
                continue
            state = self._as_pool_state(state, path)
            logits = logits.to(self.device) if logits is not None else None
            loaded += self.prefix_cache.insert(ids, state, logits, per) is not None
        log.info("--prefix-cache-dir %s: %d states loaded in %.2f s (%d more on disk than the cache holds)",
                 d.path, loaded, time.perf_counter() - t0, len(found) - len(fit))
        return d

    def _persist(self, ids, state: list[torch.Tensor], logits: torch.Tensor | None) -> None:
        """Hand a snapshot to the --prefix-cache-dir writer: on CUDA as copies to (pinned) host
        memory queued on the stream behind the snapshot, with an event the writer waits for; on
        the host as it is (nothing writes into a snapshot once taken)."""
        if not self.state_dir.wants(ids, logits is not None):
            return
        ready = None
        if self.device.type == "cuda":
            state = [t.to("cpu", non_blocking=True) for t in state]
            logits = logits.to("cpu", non_blocking=True) if logits is not None else None
            ready = torch.cuda.Event()
            ready.record()
        self.state_dir.put(ids, state, logits, ready)

    # ---- state files: export / import (engine thread) -----------------------------------------
    def _cache_for_states(self) -> PrefixCache:
        if self.prefix_cache is None:
            raise state_file.StateCacheError("the prompt-state cache is off (--no-enable-prefix-caching), and states "
                                             "are exported from it and imported into it", off=True)
        return self.prefix_cache

    def _cache_full(self, n: int) -> state_file.StateCacheError:
        c = self.prefix_cache
        pinned = sum(e.pinned for e in c.entries)
        return state_file.StateCacheError(
            f"the prompt-state cache cannot keep the state after {n} tokens: its {c.budget_bytes / 1e9:.2f} GB "
            f"(--prefix-cache-gb) hold {pinned} pinned states and a state takes {self.entry_bytes() / 1e6:.1f} MB; "
            f"unpin states (DELETE /v1/state/pins, LLM.unpin_states) or give the cache more memory")

    def state_entry(self, ids: list[int]) -> CacheEntry:
        """The cached state after exactly `ids`, with its logits if kept, copied to the host
        (what a state file holds). Raises StateCacheError when the cache does not hold it."""
        e = self._cache_for_states().get(ids)
        if e is None:
            raise self._cache_full(len(ids))
        return CacheEntry(e.ids, [t.cpu() for t in e.state], e.logits.cpu() if e.logits is not None else None,
                          e.nbytes)

    def import_state(self, ids: list[int], state: list[torch.Tensor], logits: torch.Tensor | None) -> CacheEntry:
        """Put a checked state (state_file.loads) into the cache, pinned: from now on a prompt
        that starts with `ids` continues from it. Raises StateCacheError when it cannot be kept."""
        cache = self._cache_for_states()
        state = self._as_pool_state(state, "an imported state")
        logits = logits.to(self.device, torch.float32) if logits is not None else None
        entry = cache.insert(ids, state, logits, self.entry_bytes(), pinned=True)
        if entry is None:
            raise self._cache_full(len(ids))
        if self.state_dir is not None:
            self._persist(entry.ids, entry.state, entry.logits)
        return entry

    def unpin_states(self) -> int:
        """Unpin every pinned state (imported ones): LRU eviction may take them again. Returns how many."""
        return self.prefix_cache.unpin_all() if self.prefix_cache is not None else 0

    def _as_pool_state(self, state: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """A state from a file, on this device in the pool's dtype. A state saved in another dtype
        is converted (said in the log): float32 -> 16 bits rounds once, 16 bits -> float32 is exact
        (and keeps the rounding that the 16-bit engine's state already had)."""
        got = state[0].dtype if state else self.state_dtype
        if got != self.state_dtype:
            log.info("%s: state stored in %s, converted to this engine's state dtype %s", what,
                     str(got).removeprefix("torch."), str(self.state_dtype).removeprefix("torch."))
        return [t.to(self.device, self.state_dtype).contiguous() for t in state]

    def entry_bytes(self) -> int:
        """One snapshot: the state of every layer (in the pool's dtype), plus the logits after it [V] float32."""
        return self.model_config.state_bytes(self.engine_config.state_dtype) + 4 * self.model_config.vocab_size

    def _take_snapshots(self, logits_of: dict[int, torch.Tensor] | None = None) -> None:
        """Keep the snapshots the scheduler asked for: a copy of the slot, queued on the stream
        behind the step that computed it (so no sync, and correct though the slot is reused
        later). logits_of: id(request) -> its row of this step's logits, for the prompt ends."""
        snaps, self.scheduler.snapshots = self.scheduler.snapshots, []
        todo = []   # (ids, slot, logits row or None)
        for r, k in snaps:
            ids = (r.prompt_token_ids + r.output_token_ids)[:k]
            row = logits_of.get(id(r)) if logits_of and k == r.num_prompt else None
            old = self.prefix_cache.get(ids)
            if old is not None and (row is None or old.logits is not None):
                continue
            todo.append((ids, r.slot, row))
        if not todo:
            return
        # One copy per layer for all of this step's snapshots (and one for their logits): at 256
        # sequences finishing together, a clone per slot and layer cost ~0.7 ms per snapshot in
        # launches and allocations (H200, 7B: decode batch 256 at 0.84 of its speed without them).
        # The snapshots are views of these copies, which live until their last view is evicted.
        states = self.runner.pool.snapshot_many([slot for _, slot, _ in todo])
        rows = [i for i, (_, _, row) in enumerate(todo) if row is not None]
        kept = dict(zip(rows, torch.stack([todo[i][2] for i in rows]).unbind(0))) if rows else {}
        for i, (ids, _, _) in enumerate(todo):
            state, logits = states[i], kept.get(i)
            self.prefix_cache.insert(ids, state, logits, self.entry_bytes())
            if self.state_dir is not None:
                self._persist(ids, state, logits)

    def add(self, req: Request) -> None:
        if req.params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
        if req.params.logprobs is not None:
            req.output_logprobs = []
        self.scheduler.add(req)

    def abort(self, req: Request) -> None:
        self.scheduler.finish(req, "abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def stats(self) -> dict[str, float]:
        """Gauges (running, waiting, slots) and the cumulative counters (the device time of
        the last step or two may still be on its way)."""
        if self._timings:
            self._read_timings()
        cache = self.prefix_cache.stats() if self.prefix_cache is not None else {}
        if self.state_dir is not None:
            cache.update(self.state_dir.stats())
        return {**self.scheduler.stats(), **self.counters, **cache}

    def reset_counters(self) -> None:
        if self._timed:
            torch.cuda.synchronize(self.device)
        self._timings.clear()
        self.counters = dict(COUNTERS)

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
        """Run one step. Returns the requests that got a token or finished.

        With async scheduling (CUDA), a decode-only step is queued on the device before the
        tokens of the step before it are read back: the host's work for step k (reading
        tokens, detokenizing, stop checks, handing outputs over, scheduling) overlaps the
        device's work for step k+1. A sequence that stops at step k has then also been run in
        step k+1; that token is dropped. Steps with prompt chunks or penalties (which need the
        previous tokens on the host) wait for the step in flight first. A step with rows under a
        structured-output constraint queues its forward pass first, then reads the step in
        flight back (its tokens advance the grammars), then fills the masks and samples: the
        device runs the forward pass while the host waits and fills (`_launch`)."""
        touched: dict[str, Request] = {}
        if self._timings:
            self._read_timings()
        if self.scheduler.snapshots:   # the ends of generations, before their slots are freed
            self._take_snapshots()
        out = self.scheduler.schedule()
        if out and self._in_flight is not None and self._can_overlap(out):
            self._in_flight = self._launch(out, self._in_flight, touched)   # (completes the step in flight)
            return list(touched.values())
        if self._in_flight is not None:
            self._complete(self._in_flight, touched)
            self._in_flight = None
            out.decode = [r for r in out.decode if not r.finished]
        if out:
            launched = self._launch(out, None)
            if self._can_overlap(out):
                self._in_flight = launched
            else:
                self._complete(launched, touched)
        return list(touched.values())

    def end_step(self) -> None:
        """After the step's outputs were processed (stop strings may have finished requests):
        keep the snapshots of generations that ended, while their slots still hold them."""
        if self.scheduler.snapshots:
            self._take_snapshots()

    def _can_overlap(self, out: SchedulerOutput) -> bool:
        return self.async_scheduling and not out.prefill and not out.cached \
            and not any(r.params.needs_penalties for r in out.decode)

    def _launch(self, out: SchedulerOutput, prev: _Step | None = None,
                touched: dict[str, Request] | None = None) -> _Step:
        """Queue the step's forward pass and sampling on the device; the scheduler counts its
        tokens as computed (nothing here waits for the sampled tokens). prev: the step in flight,
        whose tokens feed this one on the device; it is completed here (into `touched`): after
        this step's sampling is queued, or, when a row here is constrained, before its mask is
        filled (the mask needs prev's token), while the forward pass runs."""
        start = None
        if self._timed:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        if prev is not None and prev.sample is not None:
            res = self.runner.execute(out, prev.rows, prev.sample.token_ids)
        else:
            res = self.runner.execute(out)
        for r, n in out.prefill:
            if r.request_id in res.prompt_logits:
                self._add_prompt_logprobs(r, res.prompt_logits[r.request_id], n)
        done = self.scheduler.advance(out, time.monotonic())
        if self.scheduler.snapshots:
            self._take_snapshots({id(r): res.logits[i] for i, r in enumerate(res.reqs)})
        c = self.counters
        c["steps"] += 1
        c["prefill_steps"] += bool(out.prefill)
        c["prefill_tokens"] += sum(n for _, n in out.prefill)
        c["decode_tokens"] += len(out.decode)
        pending = None
        if res.reqs:
            logits = res.logits
            if self.sample_vocab < logits.shape[-1]:
                logits[:, self.sample_vocab:] = float("-inf")
            if any(r.grammar is not None for r in res.reqs):
                if prev is not None:
                    self._complete(prev, touched)
                    prev = None
                if self._masks is None:
                    self._masks = GrammarMasks(self.runner.pool.num_slots, logits.shape[-1], self.device)
                self._masks.apply(logits, res.reqs)
            pending = sample(logits, res.reqs).start_copy()
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._timings.append((start, end, bool(out.prefill)))
        if prev is not None:
            self._complete(prev, touched)
        return _Step(res.reqs, pending, done)

    def _complete(self, step: _Step, touched: dict[str, Request]) -> None:
        """Wait for a launched step's tokens and hand them to the scheduler."""
        for r in step.done:
            touched[r.request_id] = r
        if step.sample is None:
            return
        res = step.sample.resolve()
        for r in self.scheduler.update_from_output(step.reqs, res.token_ids, res.logprobs, res.sampled_logprob,
                                                   time.monotonic()):
            touched[r.request_id] = r
            if r.grammar is not None:
                self._advance_grammar(r)

    def _advance_grammar(self, r: Request) -> None:
        """Feed a constrained request's new token to its matcher. A stop token is accepted only
        where the grammar may end, and the scheduler has finished the request on it already (its
        stop ids are the matcher's). The mask allows nothing outside the grammar, so a refusal
        means a row without one finite allowed logit: the request ends rather than write text
        outside its grammar."""
        tok = r.output_token_ids[-1]
        if not r.grammar.accept_token(tok) and not r.finished:
            log.warning("request %s: token %d is outside its grammar; ending it", r.request_id, tok)
            self.scheduler.finish(r, "abort")

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

    def warm_up(self) -> None:
        """Two short requests through every kind of step (a variable-length prefill, a step that
        admits a prompt while another decodes, graph decode, sampling) so that the kernels'
        first compilations happen before the engine says it is ready, not in users' requests."""
        t0 = time.perf_counter()
        V = self.model_config.vocab_size
        sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        for n in (37, 300):
            self.add(Request(f"warm-up-{n}", [(3 + i) % V for i in range(n)], sp, frozenset()))
        budget = self.scheduler.max_num_batched_tokens
        self.scheduler.max_num_batched_tokens = 64   # the long prompt comes in chunks beside a decode
        # a scratch cache: the warm-up's prompts are neither kept, nor written, nor evict loaded states
        cache, state_dir, self.state_dir = self.prefix_cache, self.state_dir, None
        if cache is not None:
            self.prefix_cache = self.scheduler.prefix_cache = PrefixCache(cache.budget_bytes)
        try:
            while self.has_work:
                self.step()
        finally:
            self.scheduler.max_num_batched_tokens = budget
            self.scheduler.snapshots.clear()
            self.prefix_cache = self.scheduler.prefix_cache = cache
            self.state_dir = state_dir
            self.reset_counters()
        log.info("warm-up requests done in %.1f s", time.perf_counter() - t0)
        if self.device.type == "cuda":
            self._warm_up_masks()

    def _warm_up_masks(self) -> None:
        """Structured output's mask kernel (xgrammar's, in Triton) compiles on its first call: here,
        not inside the first constrained step, which every running stream would wait for. A
        failure is logged, not raised: unconstrained serving does not need it."""
        t0 = time.perf_counter()
        try:
            self._masks = GrammarMasks(self.runner.pool.num_slots, self.model_config.vocab_size, self.device)
            self._masks.warm_up()
            torch.cuda.synchronize(self.device)
        except ImportError:   # xgrammar not installed: a constrained request will say so
            return
        except Exception as e:   # (the first constrained step raises it again, with its traceback)
            log.warning("structured output's mask kernel did not warm up: %s", e)
            self._masks = None
            return
        log.info("structured output's mask kernel ready in %.1f s", time.perf_counter() - t0)
