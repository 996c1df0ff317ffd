"""LLMEngine: the synchronous engine that `LLM`, the CLI and the async front's thread drive.

It is the token engine (tnl.engine.core) plus the output processor (tnl.engine.output), and
the one place a request is checked before it runs (typed InvalidRequest errors).
"""
from __future__ import annotations

import functools
import itertools
import logging
from concurrent.futures import Future

from tnl.config import EngineConfig
from tnl.engine.core import EngineCore
from tnl.engine.errors import InvalidRequest
from tnl.engine.output import OutputProcessor
from tnl.engine.request import Request, RequestOutput
from tnl.engine.sampling_params import SamplingParams, StructuredOutputs
from tnl.engine.structured import StructuredOutputManager, encoded_vocab

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model, tokenizer=None, engine_config: EngineConfig | None = None,
                 extra_stop_ids: set[int] | None = None):
        cfg = model.config
        eos = cfg.eos_token_id
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = tokenizer.eos_token_id
        stop_ids = ({eos} if eos is not None else set()) | set(extra_stop_ids or ())
        # Checkpoints may pad the embedding past the tokenizer's pieces; ids there cannot be
        # decoded, so they are never sampled.
        sample_vocab = cfg.vocab_size
        if tokenizer is not None and tokenizer.vocab_size < sample_vocab:
            log.warning("the model has %d token ids but the tokenizer only %d: ids >= %d are never sampled",
                        sample_vocab, tokenizer.vocab_size, tokenizer.vocab_size)
            sample_vocab = tokenizer.vocab_size
        self.core = EngineCore(model, engine_config or EngineConfig(), stop_ids, sample_vocab)
        self.output = OutputProcessor(tokenizer)
        self.tokenizer = tokenizer
        self.model = model
        self.model_config = cfg
        self.engine_config = self.core.engine_config
        self.device = self.core.device
        self.scheduler = self.core.scheduler
        self.runner = self.core.runner
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        # structured output's grammar compiler (xgrammar is loaded on its first compile); a
        # grammar constrains text, so a checkpoint without a tokenizer has none
        self.structured: StructuredOutputManager | None = None
        if tokenizer is not None:
            self.structured = StructuredOutputManager(functools.partial(encoded_vocab, tokenizer), cfg.vocab_size,
                                                      sorted(self.core.stop_ids))
        if self.device.type == "cuda":
            self.core.warm_up()
        log.info("engine ready: %d state slots (%.1f MB each, %s), token budget %d, device %s, async scheduling %s",
                 self.engine_config.max_num_seqs, cfg.state_bytes(self.engine_config.state_dtype) / 1e6,
                 self.engine_config.state_dtype, self.engine_config.max_num_batched_tokens,
                 self.device, "on" if self.core.async_scheduling else "off")

    # ---- requests ---------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest (naming the field) for a request this engine cannot run."""
        ids = prompt_token_ids
        if not isinstance(ids, list) or not ids:
            raise InvalidRequest("prompt", "prompt is empty: give at least one token")
        V = self.model_config.vocab_size
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V:
                raise InvalidRequest("prompt", f"prompt: token id {t!r} at position {i} is outside the "
                                               f"vocabulary [0, {V})")
        limit = self.engine_config.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise InvalidRequest("prompt", f"prompt has {len(ids)} tokens, more than this server's limit of "
                                           f"{limit} (--max-prompt-tokens)")
        for t in params.stop_token_ids:
            if not 0 <= t < V:
                raise InvalidRequest("stop_token_ids", f"stop_token_ids: token id {t} is outside the vocabulary "
                                                       f"[0, {V})")
        if params.stop and self.tokenizer is None:
            raise InvalidRequest("stop", "stop strings need a tokenizer, and this checkpoint has none: use "
                                         "stop_token_ids")
        if params.structured_outputs is not None and self.structured is None:
            raise InvalidRequest("structured_outputs", "structured outputs constrain text, and this checkpoint has "
                                                       "no tokenizer")

    def start_compiles(self, params: list[SamplingParams]) -> list[tuple[StructuredOutputs, Future]]:
        """Start compiling the distinct structured-output constraints of these params in the
        compile pool (thread-safe; cached ones are done at once): (constraint, future of its
        compiled grammar) pairs, whose exceptions are InvalidRequest."""
        specs = list({id(p.structured_outputs): p.structured_outputs for p in params
                      if p.structured_outputs is not None}.values())
        if specs and self.structured is None:
            raise InvalidRequest("structured_outputs", "structured outputs constrain text, and this checkpoint has "
                                                       "no tokenizer")
        return [(spec, self.structured.submit(spec)) for spec in specs]

    def prepare(self, params: list[SamplingParams]) -> None:
        """Compile the structured-output grammars of these params, all at once, waiting here
        (add_request then finds them compiled). Raises InvalidRequest for one that cannot compile."""
        for spec, fut in self.start_compiles(params):
            spec.compiled = (self.structured, fut.result())

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, validate: bool = True,
                    boundaries: list[int] | None = None) -> Request:
        """Queue a request (checked first unless the caller already did: `validate=False`).
        boundaries: prompt lengths worth a prompt-state snapshot besides the prompt's end (the
        end of each chat message: `Tokenizer.chat_boundaries`). Raises InvalidRequest, or
        QueueFullError at --max-waiting."""
        if validate:
            self.validate(prompt_token_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequest(None, f"request id {request_id!r} is already in use")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.core.stop_ids)
        grammar = None
        if params.structured_outputs is not None:
            # compiled already when the caller prepared it (the server does, off its event loop);
            # else here, on the caller's thread
            compiled = self.structured.compile(params.structured_outputs)
            if not stop_ids:   # ignore_eos without stop_token_ids: a complete grammar still needs an end
                stop_ids = set(self.core.stop_ids)
            grammar = self.structured.matcher(compiled, sorted(stop_ids))
        req = Request(request_id, list(prompt_token_ids), params, frozenset(stop_ids), prompt=prompt, grammar=grammar)
        if self.core.prefix_cache is not None:
            L = req.num_prompt
            req.boundaries = sorted({b for b in boundaries or () if 0 < b < L} | {L})
        self.core.add(req)
        self.output.add(req)
        self.requests[request_id] = req
        return req

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            self.core.abort(req)
        return req

    def release(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.output.release(request_id)

    @property
    def has_work(self) -> bool:
        return self.core.has_work

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One engine step; returns the requests that got new output or finished."""
        touched = self.core.step()
        for req in touched:
            self.output.update(req, self.scheduler)
        self.core.end_step()
        return touched

    def take_delta(self, req: Request) -> RequestOutput:
        return self.output.take_delta(req)

    def final_output(self, req: Request) -> RequestOutput:
        return self.output.final_output(req)
