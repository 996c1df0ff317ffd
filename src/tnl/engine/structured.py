"""Structured output: the text a request may write, held to a JSON Schema, a regex, a choice or
a grammar by xgrammar (github.com/mlc-ai/xgrammar): its compiler turns the constraint into a
grammar over the model's vocabulary, its matcher follows the request's tokens and gives the
next token's allowed set as a bitmask [ceil(V / 32)] int32.

Where each part runs, and why there:
- **Compile** (StructuredOutputManager): in a thread pool, never on the event loop nor on the
  engine thread, whose every step the running streams wait for. The server awaits the compile
  before it submits a request (AsyncEngine.prepare), so a grammar that cannot compile is a 400
  before anything is queued; LLMEngine.add_request compiles on its caller's thread otherwise.
  Compiled grammars are kept in an LRU by the constraint's key within a byte budget (one cache:
  xgrammar's own is off), and concurrent requests with one constraint share one compile.
- **Match** (one xgrammar.GrammarMatcher per request, Request.grammar): the core advances it
  with each output token it accepts (EngineCore._complete). Only output tokens: a prompt-state
  cache hit skips prompt tokens, which a matcher never sees, so there is nothing to replay.
- **Mask** (GrammarMasks): between the forward pass and sampling. The constrained rows'
  bitmasks are filled on the CPU after the forward pass is queued (on CUDA the GPU runs it
  meanwhile), copied to the device and applied to those rows' logits (-inf where not allowed).
  Rows without a constraint are never touched, and a step without a constrained row does no
  mask work at all. Logprobs are then those of the constrained distribution (as vLLM's).

The vocabulary xgrammar sees is what tnl's detokenizer writes after a prompt: "▁" as a space
(a continuation keeps its leading space), byte-fallback pieces as their byte, special pieces
as nothing (never allowed; the stop ids are allowed where the grammar may end). A prompt of
special tokens only is the exception: there the first piece's leading space is dropped from
the text, which the grammar counted.

xgrammar is imported on the first compile: it brings transformers (~1.5 s), which a CPU
engine that never sees a constraint should not pay for. A CUDA engine imports it in its
warm-up, whose mask-kernel call compiles xgrammar's Triton kernel there rather than in the
first constrained step (EngineCore._warm_up_masks).
"""
from __future__ import annotations

import collections
import concurrent.futures
import importlib.metadata
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence

import torch

from tnl.engine.errors import InvalidRequest
from tnl.engine.request import Request
from tnl.engine.sampling_params import StructuredOutputs

log = logging.getLogger(__name__)

CACHE_BYTES = 512 << 20        # compiled grammars kept (a JSON Schema over a 64k vocabulary: ~0.1-10 MB)
COMPILE_WORKERS = 2            # compiles at once (each also uses up to COMPILE_THREADS for its masks)
COMPILE_THREADS = 8
# JSON's whitespace between two tokens, at most (a newline and 4 levels of 4-space indent, and some): a
# model may otherwise spend its whole max_tokens on whitespace inside a value (small models do)
JSON_MAX_WHITESPACE = 20
# what xgrammar was asked to compile, for its refusals
WHAT = {"json": "a JSON Schema that xgrammar cannot compile", "json_object": "cannot compile a JSON object grammar",
        "regex": "a regular expression that xgrammar cannot compile",
        "choice": "choices that xgrammar cannot compile", "grammar": "an EBNF grammar that xgrammar cannot parse"}
# xgrammar's C++ errors start "[hh:mm:ss] /project/cpp/file.cc:94: " and maybe "Check failed: (...) is false: "
_LOG_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s*\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


def encoded_vocab(tokenizer) -> list[bytes]:
    """Each token id's bytes as tnl's detokenizer writes them after a prompt; b"" for special
    pieces (xgrammar never allows an empty token, save the stop ids)."""
    special = tokenizer.special_token_ids
    return [b"" if i in special else bytes(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)]


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose root is exactly one of `choices` (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _reason(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return _LOG_PREFIX.sub("", lines[0]).strip() if lines else type(e).__name__


class StructuredOutputManager:
    """One model's grammar compiler: xgrammar's TokenizerInfo (built once, from `load_vocab()`
    padded to the model's `vocab_size`: ids past the tokenizer's are never allowed), its
    GrammarCompiler, the compile pool and the cache. Thread-safe.

    Args:
        load_vocab: () -> each id's bytes (`encoded_vocab(tokenizer)`); called on the first compile
        vocab_size: the model's (the logits' width)
        stop_ids: the ids that end an output where the grammar may end (EOS and the model's stop
            ids); a request's own stop ids override them (`matcher`)
    """

    def __init__(self, load_vocab: Callable[[], Sequence[bytes]], vocab_size: int, stop_ids: Sequence[int],
                 cache_bytes: int = CACHE_BYTES):
        self.vocab_size = vocab_size
        self.stop_ids = sorted(t for t in stop_ids if 0 <= t < vocab_size)
        self.cache_bytes = cache_bytes
        self._load_vocab = load_vocab
        self._compiler = None
        self._compiler_lock = threading.Lock()   # (not _lock: building it takes ~0.5-2 s, and submit waits on _lock)
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="tnl-grammar")
        self._cache: collections.OrderedDict[tuple, tuple[object, int]] = collections.OrderedDict()
        self._cached_bytes = 0
        self._pending: dict[tuple, concurrent.futures.Future] = {}

    # ---- compiling (any thread) -----------------------------------------------------------------
    def submit(self, spec: StructuredOutputs) -> concurrent.futures.Future:
        """The compiled grammar of `spec` as a future: done at once from the cache, else compiled
        in the pool (one compile for all who ask while it runs). Its exception is an
        InvalidRequest naming the field (xgrammar's reason in the message)."""
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                fut = concurrent.futures.Future()
                fut.set_result(hit[0])
                return fut
            fut = self._pending.get(key)
            if fut is None:
                fut = self._pending[key] = self._pool.submit(self._compile, key)
                fut.add_done_callback(lambda f, key=key: self._done(key, f))
            return fut

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar of `spec`, waiting for it here (attached to spec: the next ask is free)."""
        if spec.compiled is not None and spec.compiled[0] is self:
            return spec.compiled[1]
        grammar = self.submit(spec).result()
        spec.compiled = (self, grammar)
        return grammar

    def _done(self, key: tuple, fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if fut.cancelled() or fut.exception() is not None:
                return
            grammar = fut.result()
            size = max(1, grammar.memory_size_bytes)
            self._cache[key] = (grammar, size)
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, (_, n) = self._cache.popitem(last=False)
                self._cached_bytes -= n

    def _xgrammar_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                t0 = time.perf_counter()
                import xgrammar as xgr
                vocab = list(self._load_vocab())
                info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                         stop_token_ids=self.stop_ids or None, add_prefix_space=False)
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
                log.info("structured output: xgrammar %s over %d token ids (%d pieces) ready in %.2f s",
                         importlib.metadata.version("xgrammar"), self.vocab_size, len(vocab), time.perf_counter() - t0)
            return self._compiler

    def _compile(self, key: tuple):
        """In a pool thread: the CompiledGrammar of a StructuredOutputs key."""
        kind, text, compact = key
        compiler = self._xgrammar_compiler()
        t0 = time.perf_counter()
        try:
            if kind in ("json", "json_object"):
                schema = text if kind == "json" else '{"type": "object"}'
                grammar = compiler.compile_json_schema(schema, any_whitespace=not compact,
                                                       max_whitespace_cnt=None if compact else JSON_MAX_WHITESPACE)
            elif kind == "regex":
                grammar = compiler.compile_regex(text)
            elif kind == "choice":
                grammar = compiler.compile_grammar(choice_grammar(json.loads(text)))
            else:
                grammar = compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as e:   # xgrammar's C++ refusals arrive as RuntimeError
            param = f"structured_outputs.{kind}"
            raise InvalidRequest(param, f"{param}: {WHAT[kind]}: {_reason(e)}") from None
        log.debug("structured output: %s grammar (%d characters) compiled in %.3f s", kind, len(text),
                  time.perf_counter() - t0)
        return grammar

    # ---- requests (engine thread) ------------------------------------------------------------------
    def matcher(self, grammar, stop_ids: Sequence[int]):
        """A request's matcher over a compiled grammar: EOS (its stop ids) only where it may end."""
        import xgrammar as xgr
        return xgr.GrammarMatcher(grammar, override_stop_tokens=sorted(stop_ids) or None)


class GrammarMasks:
    """The bitmask buffers of one engine: [max_rows, ceil(V / 32)] int32 on the host (pinned on
    CUDA) and on the device, one row per logits row.

    One buffer, not two in turn: a step's bitmask is filled only after the step before it was
    read back (its tokens advance the matchers), and that read waits for the step's sampling,
    which comes after its bitmask's copy. So the copy out of the buffer is over before the next
    fill writes it."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        import xgrammar as xgr
        self._xgr = xgr
        self.vocab_size = vocab_size
        self.device = device
        width = (vocab_size + 31) // 32
        self.host = torch.zeros(max_rows, width, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.dev = torch.zeros(max_rows, width, dtype=torch.int32, device=device) if device.type == "cuda" else None
        self._batch = xgr.BatchGrammarMatcher()

    def warm_up(self) -> None:
        """One masked row of zero logits through the device kernel (its first call compiles it)."""
        logits = torch.zeros(1, self.vocab_size, dtype=torch.float32, device=self.device)
        self.host[0].fill_(-1)   # every token allowed
        mask, index = self.host[:1], [0]
        if self.dev is not None:
            self.dev[:1].copy_(mask, non_blocking=True)
            mask, index = self.dev[:1], torch.zeros(1, dtype=torch.int32, device=self.device)
        self._xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=index)
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("xgrammar's mask kernel masked a token that an all-ones mask allows")

    def apply(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        """logits [N, V] float32 (row i: reqs[i]), in place: -inf where a constrained row's grammar
        does not allow the token. Rows of requests that ended (their token will be dropped) are
        left as they are: a matcher that took its stop token has no next mask."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.finished
                and not r.grammar.is_terminated()]
        if not rows:
            return
        n = logits.shape[0]
        matchers = [reqs[i].grammar for i in rows]
        if len(rows) == 1:
            matchers[0].fill_next_token_bitmask(self.host, rows[0])
        else:
            self._batch.batch_fill_next_token_bitmask(matchers, self.host, rows)
        mask, index = self.host[:n], rows
        if self.dev is not None:   # both copies from pinned memory: no wait for the forward pass in flight
            self.dev[:n].copy_(mask, non_blocking=True)
            mask = self.dev[:n]
            index = torch.tensor(rows, dtype=torch.int32, pin_memory=True).to(self.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=index)

