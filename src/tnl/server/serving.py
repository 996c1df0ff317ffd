"""What every generating route shares: the server's state, prompt checks, and `Generation`,
which runs the engine requests of one HTTP request and merges their output streams.

The server never touches tensors: it turns JSON into token ids and SamplingParams, and engine
deltas back into JSON.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tnl.engine.async_engine import EngineClient, Job
from tnl.engine.errors import InvalidRequest, QueueFullError
from tnl.engine.output import merge_deltas
from tnl.engine.request import RequestOutput
from tnl.engine.sampling_params import SamplingParams, StructuredOutputs
from tnl.server.config import ServerConfig
from tnl.server.errors import APIError
from tnl.server.metrics import ServerMetrics
from tnl.server.protocol import STRUCTURED_FIELDS

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # Retry-After on 429: a slot frees within a few decode steps of most requests


class ClientDisconnected(APIError):
    """The client went away before its answer was ready (logged as 499, as nginx does)."""

    def __init__(self):
        super().__init__("client disconnected", 499)


@dataclass
class ServerState:
    """Shared by all routes of one app (app.state.tnl)."""

    config: ServerConfig
    metrics: ServerMetrics
    engine: EngineClient | None = None     # once loaded
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    shutting_down: bool = False
    generations: set["Generation"] = field(default_factory=set)   # started and not yet closed

    def begin_shutdown(self, grace_s: float) -> None:
        """SIGTERM / Ctrl-C (from the event loop): new requests and those still waiting for a slot
        get a 503 now; those running may go on for `grace_s` seconds, then streams end as aborted
        and the others get a 503, so that every client gets a whole answer before the server stops."""
        self.shutting_down = True
        queued = [gen for gen in self.generations if not gen.started]
        for gen in queued:
            gen.refuse_for_shutdown()
        running = len(self.generations) - len(queued)
        log.info("shutting down: %d waiting requests refused (503), %d running may take up to %g s",
                 len(queued), running, grace_s)
        asyncio.get_running_loop().call_later(grace_s, self._end_running, grace_s)

    def _end_running(self, grace_s: float) -> None:
        gens = [gen for gen in self.generations if gen.started]
        if gens:
            log.info("the %g s shutdown grace period is over: ending %d running requests", grace_s, len(gens))
        for gen in gens:
            gen.end_for_shutdown(grace_s)

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def ready(self) -> bool:
        return self.engine is not None and bool(getattr(self.engine, "ready", False)) and not self.shutting_down

    def require_engine(self):
        if self.load_error is not None:
            raise APIError(f"the model failed to load: {self.load_error}", 503)
        if self.shutting_down:
            raise APIError(SHUTTING_DOWN, 503, headers={"Connection": "close"})
        if not self.ready:
            raise APIError("the model is still loading; retry when GET /health answers 200", 503,
                           headers={"Retry-After": "5"})
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(f"the model '{name}' does not exist; this server serves '{self.model_name}' "
                           f"(see GET /v1/models)", 404, "model")

    def tokenizer(self, param: str):
        tok = self.require_engine().tokenizer
        if tok is None:
            raise APIError("this model has no tokenizer (no tokenizer.model in the checkpoint): send token "
                           "ids to /v1/completions instead of text", 400, param)
        return tok

    @property
    def vocab_size(self) -> int:
        return self.require_engine().model_config.vocab_size

    async def encode_text(self, text: str, param: str, add_special_tokens: bool = True,
                          allow_empty: bool = False) -> list[int]:
        """Text -> ids, in a worker thread (see encode_chat). Empty text is refused unless
        `allow_empty` (POST /tokenize, where "" is [BOS])."""
        if text == "" and not allow_empty:
            raise APIError(f"{param} is empty", 400, param)
        tok = self.tokenizer(param)
        return await asyncio.to_thread(tok.encode, text, add_special_tokens=add_special_tokens)

    async def encode_chat(self, messages: list[dict[str, str]], param: str,
                          add_generation_prompt: bool = True) -> list[int]:
        """Chat template -> ids, exactly as the offline `LLM.chat` does (a BOS is added unless
        the template already starts with one).

        Tokenizing runs in a worker thread (asyncio's default pool), not on the event loop: a
        prompt of megabytes takes seconds, and GET /health and running streams must not wait for
        it. SentencePiece is safe to call from several threads at once and releases the GIL while
        it encodes (google/sentencepiece #657, #1251); a Jinja template renders into a new context
        on each call."""
        tok = self.tokenizer(param)
        try:
            return await asyncio.to_thread(tok.apply_chat_template, messages,
                                           add_generation_prompt=add_generation_prompt, tokenize=True)
        except ValueError as e:  # the template's raise_exception(), or a message it cannot render
            raise APIError(f"{param}: {e}", 400, param) from None

    def token_text(self, token_id: int) -> str:
        """A token as logprob displays show it; "token_id:N" when the model has no tokenizer."""
        tok = self.engine.tokenizer
        if tok is None or not 0 <= token_id < tok.vocab_size:  # the model's vocab may be the larger
            return f"token_id:{token_id}"
        return tok.token_text(token_id)

    def token_bytes(self, token_id: int) -> list[int]:
        """The UTF-8 bytes a token stands for (one raw byte for a byte-fallback piece)."""
        tok = self.engine.tokenizer
        if tok is None or not 0 <= token_id < tok.vocab_size:
            return list(self.token_text(token_id).encode())
        return tok.token_bytes(token_id)


def get_state(request: Request) -> ServerState:
    """The app's ServerState (every route's first line)."""
    return request.app.state.tnl


def sampling_params(param_fields: dict) -> SamplingParams:
    """SamplingParams, with the engine's InvalidRequest turned into a 400 naming the field."""
    try:
        return SamplingParams(**param_fields)
    except InvalidRequest as e:
        raise APIError(e.message, 400, e.param) from None


def structured_outputs(body) -> tuple[StructuredOutputs | None, str | None]:
    """A request's constraint on its text (its response_format, or vLLM's structured_outputs),
    and the request field an engine refusal of it names (None: the engine's own names,
    structured_outputs.*, are the request's). Two constraints at once are a 400."""
    fmt, so = body.response_format, body.structured_outputs
    if fmt is not None and fmt.type != "text" and so is not None:
        raise APIError("give one of response_format or structured_outputs, not both: each constrains the output",
                       400, "structured_outputs")
    if so is not None:
        fields, param = {f: getattr(so, "json_" if f == "json" else f) for f in STRUCTURED_FIELDS}, None
        fields["disable_any_whitespace"] = so.disable_any_whitespace
    elif fmt is not None and fmt.type == "json_object":
        fields, param = {"json_object": True}, "response_format"
    elif fmt is not None and fmt.type == "json_schema":
        fields, param = {"json": fmt.json_schema.schema_}, "response_format.json_schema.schema"
    else:
        return None, None
    try:
        return StructuredOutputs(**fields), param
    except InvalidRequest as e:
        raise constraint_error(e, param) from None


def constraint_error(e: InvalidRequest, param: str | None) -> APIError:
    """A 400 for the engine's refusal of a constraint, naming the request field it came from."""
    message = e.message
    if param is not None and e.param and e.param.startswith("structured_outputs"):
        message = param + message.removeprefix(e.param)
    return APIError(message, 400, param or e.param)


def client_key(state: ServerState, request: Request) -> str:
    """Whom a request counts against in the waiting queue's fair share (AsyncEngine.submit_group):
    its API key when the server has one (--api-key; a hash, the key itself is kept nowhere),
    else the client's address."""
    if state.config.api_key:
        _, _, token = request.headers.get("authorization", "").partition(" ")
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client is not None else "-")


_DISCONNECTED = object()
_REFUSED_AT_SHUTDOWN = object()    # the server began to shut down before this request started
_ENDED_AT_SHUTDOWN = object()      # the shutdown grace period ran out while it ran

SHUTTING_DOWN = "the server is shutting down and takes no new requests; send this one to another server"


class Generation:
    """The engine requests of one HTTP request (n samples of each prompt), as one stream.

    Choice k is sample k % n of prompt k // n. `await start()` submits them all together (all
    are queued or none: AsyncEngine.submit_group) and waits until every one has produced its
    first output, so a refusal (queue full, bad prompt) becomes an HTTP error before any byte
    of the answer is sent. `outputs()` yields (choice index,
    RequestOutput delta) in arrival order. `close()` aborts whatever has not finished
    (idempotent, and it never awaits, so it can run inside a cancelled task).
    """

    def __init__(self, state: ServerState, request: Request, prompts: list[list[int]],
                 samples: list[SamplingParams], request_id: str, prompt_params: list[str] | None = None,
                 boundaries: list[list[int]] | None = None, constraint_param: str | None = None):
        """prompt_params: the request field each prompt came from ("messages", "prompt[1]"), which
        an engine refusal of that prompt names; default "prompt". boundaries: per prompt, the
        token counts where its chat messages end (prompt-state cache snapshots).
        constraint_param: the field the samples' structured-output constraint came from
        (`structured_outputs`), which a refusal to compile it names."""
        self.state = state
        self.engine = state.require_engine()
        self.request = request
        self.request_id = request_id
        self.constraint_param = constraint_param
        self.jobs = [(ids, params) for ids in prompts for params in samples]
        self.job_params = [param for param in (prompt_params or ["prompt"] * len(prompts)) for _ in samples]
        self.job_boundaries = [b for b in (boundaries or [None] * len(prompts)) for _ in samples]
        self.client = client_key(state, request)
        self.metrics = state.metrics
        self.num_prompt_tokens = sum(len(ids) for ids in prompts)  # usage counts each prompt once
        self.num_prompts = len(prompts)
        self.prompt_tokens = [len(ids) for ids, _ in self.jobs]
        self.generated = [0] * len(self.jobs)
        self.cached = [0] * len(self.jobs)   # prompt tokens each engine request took from the prompt-state cache
        self.finished = [False] * len(self.jobs)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._watcher: asyncio.Task | None = None
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._last_time = [0.0] * len(self.jobs)
        self._submitted = False
        self._started = False
        self._closed = False
        self.streaming = False   # answered by an EventStream (set by it)
        self._scope_state = request.scope.setdefault("state", {})
        self._scope_state["tokens_in"] = self.num_prompt_tokens
        self._scope_state["tokens_out"] = 0

    @property
    def num_generated_tokens(self) -> int:
        return sum(self.generated)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens not computed, counting each prompt once (as usage counts prompts): the
        fewest of its samples (n samples of a prompt: one computes it, the others copy its state)."""
        per_prompt = len(self.jobs) // self.num_prompts if self.num_prompts else 1
        return sum(min(self.cached[i:i + per_prompt]) for i in range(0, len(self.jobs), per_prompt))

    def engine_id(self, k: int) -> str:
        return f"{self.request_id}-{k}"

    @property
    def started(self) -> bool:
        """Every choice has produced output: the answer may be under way."""
        return self._started

    def refuse_for_shutdown(self) -> None:
        """The server is shutting down before this request started: `start()` raises a 503."""
        self._queue.put_nowait((None, _REFUSED_AT_SHUTDOWN))

    def end_for_shutdown(self, grace_s: float) -> None:
        """The shutdown grace period is over. A stream's unfinished choices are aborted: the
        engine ends each with a last delta (finish_reason "abort"), so the stream ends whole, with
        [DONE]. Any other request gets a 503 (its 200 has not been sent)."""
        if not self.streaming:
            self._grace_s = grace_s
            self._queue.put_nowait((None, _ENDED_AT_SHUTDOWN))
            return
        for k, done in enumerate(self.finished):
            if not done:
                self.engine.abort(self.engine_id(k))
        self._scope_state["aborted"] = True

    def _submit(self) -> None:
        """Queue every choice's engine request, all together or none (a refusal raises here).
        The engine hands choice k's outputs straight to this generation's queue (no task per
        choice between them)."""
        for k, (ids, params) in enumerate(self.jobs):
            try:
                self.engine.validate(ids, params)
            except InvalidRequest as e:
                self._check(e, k)
        put = self._queue.put_nowait
        jobs = [Job(ids, params, self.engine_id(k), lambda item, k=k: put((k, item)), self.job_boundaries[k])
                for k, (ids, params) in enumerate(self.jobs)]
        try:
            self.engine.submit_group(jobs, self.client, validate=False)
        except InvalidRequest as e:   # more sequences than may ever wait at once
            n = len(self.jobs) // self.num_prompts
            raise APIError(f"n × prompts = {n} × {self.num_prompts} = {len(self.jobs)} sequences, but {e.message}; "
                           f"lower n or send fewer prompts per request", 400, "n" if n > 1 else "prompt") from None
        except Exception as e:
            self._check(e)
        self._submitted = True

    async def _watch_disconnect(self) -> None:
        receive = self.request.receive
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log.info("request %s: client disconnected, aborting", self.request_id)
                self.close()
                self._queue.put_nowait((None, _DISCONNECTED))
                return

    async def start(self, watch_disconnect: bool = True) -> None:
        self.state.generations.add(self)   # (close() takes it out)
        try:
            try:   # structured-output grammars, compiled off the event loop before anything is queued
                await self.engine.prepare([params for _, params in self.jobs])
            except InvalidRequest as e:
                raise constraint_error(e, self.constraint_param) from None
            self._submit()
        except BaseException:
            self.close()
            raise
        if watch_disconnect:
            self._watcher = asyncio.create_task(self._watch_disconnect())
        waiting = set(range(len(self.jobs)))
        try:
            while waiting:
                k, item = await self._queue.get()
                self._check(item, k)
                waiting.discard(k)
                self._buffer.append((k, item))
        except BaseException:
            self.close()
            raise
        self._started = True

    def stop_watching(self) -> None:
        """Streaming: once the response starts, Starlette watches for the disconnect instead."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _check(self, item, k: int | None = None) -> None:
        if item is _DISCONNECTED:
            raise ClientDisconnected()
        if item is _REFUSED_AT_SHUTDOWN:
            raise APIError(f"{SHUTTING_DOWN} (it was still waiting for a slot and never started)", 503,
                           headers={"Connection": "close"})
        if item is _ENDED_AT_SHUTDOWN:
            raise APIError(f"the server shut down before this request finished: it ran for the whole "
                           f"{self._grace_s:g} s grace period (--graceful-shutdown-s); send it again to "
                           f"another server", 503, headers={"Connection": "close"})
        if isinstance(item, QueueFullError):
            raise APIError(f"the server is busy: {item}", 429, headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(item, InvalidRequest):
            param, message = item.param, item.message
            if param == "prompt" and k is not None and self.job_params[k] != "prompt":
                param = self.job_params[k]   # the field this prompt came from, in the message too
                message = param + message.removeprefix("prompt")
            raise APIError(message, 400, param)
        if isinstance(item, BaseException):
            raise item

    def _observe(self, k: int, out: RequestOutput) -> None:
        now = time.monotonic()
        new = len(out.outputs[0].token_ids) if out.outputs else 0
        m = out.metrics
        if out.num_cached_tokens:
            self.cached[k] = out.num_cached_tokens
            self._scope_state["tokens_cached"] = self.num_cached_tokens
        if self.generated[k] == 0 and new:
            if m is not None and m.first_token_time is not None:
                self.metrics.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
            if m is not None and m.first_scheduled_time is not None:
                self.metrics.queue_time.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        elif new:
            gap = (now - self._last_time[k]) / new
            for _ in range(new):
                self.metrics.itl.observe(gap)
        if new:
            self._last_time[k] = now
            self.generated[k] += new
            self.metrics.generation_tokens.inc(new)
            self._scope_state["tokens_out"] = self.num_generated_tokens
        if out.finished and not self.finished[k]:
            self.finished[k] = True
            self.metrics.prompt_tokens.inc(self.prompt_tokens[k])
            if self.generated[k] == 0 and m is not None and m.first_scheduled_time is not None:
                self.metrics.queue_time.observe(max(0.0, m.first_scheduled_time - m.arrival_time))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, delta) until every request has finished; closes on the way out.

        Deltas that queued up while the reader was busy (writing other streams' chunks) come
        out merged, one per choice: a reader slower than the engine gets bigger pieces rather
        than a growing backlog, so it never holds the engine back."""
        try:
            remaining = self.finished.count(False)
            while self._buffer:
                k, out = self._buffer.pop(0)
                self._observe(k, out)
                remaining -= out.finished
                yield k, out
            while remaining > 0:
                for k, out in self._merged([await self._queue.get()]):
                    self._observe(k, out)
                    remaining -= out.finished
                    yield k, out
            start = self._scope_state.get("start_time")
            if start is not None:
                self.metrics.e2e.observe(time.monotonic() - start)
        finally:
            self.close()

    def _merged(self, items: list) -> list[tuple[int, RequestOutput]]:
        """`items` plus whatever else is queued now, merged per choice in first-arrival order."""
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        merged: dict[int, RequestOutput] = {}
        for k, out in items:
            self._check(out, k)
            merged[k] = merge_deltas(merged[k], out) if k in merged else out
        return list(merged.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state.generations.discard(self)
        for k, done in enumerate(self.finished if self._submitted else ()):
            if not done:
                self.engine.abort(self.engine_id(k))
                if self._started:  # (a refused request was never under way)
                    self._scope_state["aborted"] = True
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        self._watcher = None


class EventStream(StreamingResponse):
    """An SSE response that aborts its generation however the response ends.

    Starlette cancels a stream when the client disconnects; if that happens while a chunk is
    being sent rather than while the body iterator awaits the engine, the iterator is left
    suspended and its `finally` would only run when garbage-collected. Closing here frees the
    engine slot at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content, generation: Generation):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation
        generation.streaming = True   # a shutdown ends it with an "abort" chunk and [DONE], not a 503

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()
