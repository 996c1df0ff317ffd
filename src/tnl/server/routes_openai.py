"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Streams are Server-Sent Events: `data: {json}\\n\\n` chunks, ending `data: [DONE]\\n\\n`.
Logprob values are clamped to -9999.0 (JSON has no -inf). `text_offset` in completion
logprobs counts characters of the `tokens` strings (as vLLM does), not of the decoded text.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from tnl.engine import RequestOutput, SamplingParams
from tnl.server.errors import APIError, error_body
from tnl.server.protocol import (
    CHAT_DEFAULT_MAX_TOKENS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingFields,
    TopLogprob,
    UsageInfo,
    error_responses,
    sse_content,
)
from tnl.server.serving import (
    EventStream,
    Generation,
    ServerState,
    get_state,
    sampling_params,
    structured_outputs,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["OpenAI"])

LOGPROB_FLOOR = -9999.0


def _lp(value: float | None) -> float:
    return LOGPROB_FLOOR if value is None or value != value or value < LOGPROB_FLOOR else float(value)


def _sse(payload: BaseModel | dict, exclude: set[str] | None = None) -> str:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude=exclude)
    else:
        body = json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n"


def _top(lps: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(lps.items(), key=lambda kv: -kv[1])[:k]


def _params(body: SamplingFields, max_tokens: int, n_index: int, **extra) -> SamplingParams:
    seed = body.seed
    if seed is not None and n_index:
        seed = (seed + n_index) % (2 ** 63)  # n samples of one seeded request must differ
    fields = dict(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        min_p=0.0 if body.min_p is None else body.min_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=seed,
        stop=list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
    )
    fields.update(extra)
    return sampling_params(fields)


def _usage(gen: Generation) -> UsageInfo:
    prompt, completion = gen.num_prompt_tokens, gen.num_generated_tokens
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.num_cached_tokens))


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _remember(request: Request, prompt: str | None = None, response: str | None = None) -> None:
    """Text for the access log (shown only with --log-prompts)."""
    st = request.scope.setdefault("state", {})
    if prompt is not None:
        st["log_prompt"] = prompt
    if response is not None:
        st["log_response"] = response


# ---- /v1/models --------------------------------------------------------------------------------

@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    return ModelList(data=[ModelCard(id=state.model_name, created=state.created, root=state.config.model)])


# ---- /v1/chat/completions ----------------------------------------------------------------------

def _chat_logprobs(state: ServerState, token_ids: list[int], lps: list[dict[int, float] | None] | None,
                   k: int) -> ChatLogprobs:
    content = []
    for i, tid in enumerate(token_ids):
        d = (lps[i] if lps and i < len(lps) else None) or {}
        content.append(ChatTokenLogprob(
            token=state.token_text(tid), logprob=_lp(d.get(tid)), bytes=state.token_bytes(tid),
            top_logprobs=[TopLogprob(token=state.token_text(t), logprob=_lp(v), bytes=state.token_bytes(t))
                          for t, v in _top(d, k)]))
    return ChatLogprobs(content=content)


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletionResponse, "content": sse_content(ChatCompletionChunk),
                              "description": "a chat.completion, or with stream: an SSE stream of "
                                             "chat.completion.chunk objects"},
                        **error_responses(404, 429, 503)})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    state.require_engine()
    state.check_model(body.model)
    messages = [m.as_template_message() for m in body.messages]
    ids = await state.encode_chat(messages, "messages", body.add_generation_prompt)
    max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_DEFAULT_MAX_TOKENS
    top_k = (body.top_logprobs or 0) if body.logprobs else None
    constraint, constraint_param = structured_outputs(body)
    samples = [_params(body, max_tokens, j, logprobs=top_k, structured_outputs=constraint) for j in range(body.n)]
    if state.config.log_prompts:
        _remember(request, prompt=repr(messages))
    rid = request.state.request_id
    boundaries = await asyncio.to_thread(state.tokenizer("messages").chat_boundaries, messages, ids)
    gen = Generation(state, request, [ids], samples, rid, ["messages"], [boundaries], constraint_param)
    await gen.start()
    created = int(time.time())
    model = state.model_name
    if body.stream:
        gen.stop_watching()
        events = _chat_stream(state, request, gen, body, f"chatcmpl-{rid}", created, model)
        return EventStream(_sse_stream(gen, events), gen)

    n = len(gen.jobs)
    texts = [[] for _ in range(n)]
    logprobs = [[] for _ in range(n)]
    finish = [None] * n
    async for k, out in gen.outputs():
        o = out.outputs[0]
        texts[k].append(o.text)
        if top_k is not None and o.token_ids:
            logprobs[k].extend(_chat_logprobs(state, o.token_ids, o.logprobs, top_k).content)
        if out.finished:
            finish[k] = o.finish_reason
    choices = [ChatChoice(index=k, message=AssistantMessage(content="".join(texts[k])),
                          logprobs=ChatLogprobs(content=logprobs[k]) if top_k is not None else None,
                          finish_reason=finish[k]) for k in range(n)]
    usage = _usage(gen)
    if state.config.log_prompts:
        _remember(request, response=repr([c.message.content for c in choices]))
    resp = ChatCompletionResponse(id=f"chatcmpl-{rid}", created=created, model=model, choices=choices,
                                  usage=usage)
    return JSONResponse(resp.model_dump())


async def _chat_stream(state: ServerState, request: Request, gen: Generation, body: ChatCompletionRequest,
                       cid: str, created: int, model: str) -> AsyncIterator[str]:
    include_usage = _include_usage(body)
    top_k = (body.top_logprobs or 0) if body.logprobs else None
    texts = [[] for _ in range(body.n)]

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        c = ChatCompletionChunk(id=cid, created=created, model=model, choices=choices, usage=usage)
        return _sse(c, exclude=None if include_usage else {"usage"})

    try:
        for k in range(body.n):
            yield chunk([ChatChunkChoice(index=k, delta=DeltaMessage(role="assistant", content=""))])
        async for k, out in gen.outputs():
            o = out.outputs[0]
            lp = _chat_logprobs(state, o.token_ids, o.logprobs, top_k) if top_k is not None and o.token_ids \
                else None
            if not (o.text or lp or out.finished):
                continue
            texts[k].append(o.text)
            yield chunk([ChatChunkChoice(index=k, delta=DeltaMessage(content=o.text) if o.text else DeltaMessage(),
                                         logprobs=lp, finish_reason=o.finish_reason if out.finished else None)])
        if include_usage:
            yield chunk([], _usage(gen))
    finally:
        if state.config.log_prompts:
            _remember(request, response=repr(["".join(t) for t in texts]))


async def _sse_stream(gen: Generation, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Ends every stream with `data: [DONE]`; an error after the response has started (status
    200 already sent) becomes an error event in OpenAI's shape before it."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield _sse(error_body(e.message, e.status, e.param))
    except Exception:
        log.exception("request %s: stream failed", gen.request_id)
        yield _sse(error_body(f"internal server error (request id {gen.request_id}); the details are in "
                              f"the server log", 500))
    finally:
        gen.close()
    yield "data: [DONE]\n\n"


# ---- /v1/completions ---------------------------------------------------------------------------

class _CompletionChoice:
    """One choice of a completion as its deltas arrive: the echoed prompt goes in front of the
    first delta, and logprobs come in OpenAI's legacy format."""

    def __init__(self, state: ServerState, body: CompletionRequest, prompt_ids: list[int], prompt_text: str | None):
        self.state = state
        self.echo = body.echo
        self.logprobs = body.logprobs
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text or ""
        self.implicit_bos = _implicit_bos(state, body, prompt_ids) is not None
        self.offset = 0          # text_offset of the next token
        self.started = False

    def delta(self, out: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        o = out.outputs[0]
        text, lp = o.text, None
        if not self.started:
            self.started = True
            if self.echo:
                text = self.prompt_text + text
                if self.logprobs is not None and self.implicit_bos:
                    # the model saw [BOS, *prompt]: every id sent has a logprob, the first one's after BOS
                    lp = self._build(self.prompt_ids, (out.prompt_logprobs or [None])[1:])
                elif self.logprobs is not None:
                    # position 0 has nothing before it to predict it: null, as OpenAI and vLLM give
                    lp = self._build(self.prompt_ids, out.prompt_logprobs, skip_first=True)
        if self.logprobs is not None and o.token_ids:
            lp = _merge(lp, self._build(o.token_ids, o.logprobs))
        return text, lp

    def _build(self, token_ids: list[int], lps: list[dict[int, float] | None] | None,
               skip_first: bool = False) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for i, tid in enumerate(token_ids):
            d = lps[i] if lps and i < len(lps) else None
            text = self.state.token_text(tid)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if d is None or (skip_first and i == 0):
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_lp(d.get(tid)))
            top = {self.state.token_text(t): _lp(v) for t, v in _top(d, self.logprobs)}
            top.setdefault(text, _lp(d.get(tid)))  # the chosen token is always listed (OpenAI)
            out.top_logprobs.append(top)
        return out


def _implicit_bos(state: ServerState, body: CompletionRequest, ids: list[int]) -> int | None:
    """The BOS id to score a token-id prompt after, or None (the ids are used as given).

    Scoring (echo with logprobs) a prompt whose ids lack the BOS that the tokenizer puts in front
    of text scores them as that text is scored: after BOS. lm-evaluation-harness sends such ids
    (its remote tokenizer calls POST /tokenize with add_special_tokens false and never adds BOS),
    and without BOS a TransNormerLLM's loglikelihoods are off by nats. The echo still lists exactly
    the ids sent. Without echo + logprobs, token ids are generated from exactly as given (vLLM).
    """
    if not (body.echo and body.logprobs is not None and ids):
        return None
    tok = state.require_engine().tokenizer
    if tok is None or not tok.add_bos_token or tok.bos_token_id is None or ids[0] == tok.bos_token_id:
        return None
    return tok.bos_token_id


def _model_prompt(state: ServerState, body: CompletionRequest, ids: list[int]) -> list[int]:
    bos = _implicit_bos(state, body, ids)
    return ids if bos is None else [bos, *ids]


def _merge(a: CompletionLogprobs | None, b: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if a is None or b is None:
        return a or b
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset, token_logprobs=a.token_logprobs +
                              b.token_logprobs, tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs +
                              b.top_logprobs)


@router.post("/v1/completions", response_model=None,
             responses={200: {"model": CompletionResponse, "content": sse_content(CompletionResponse),
                              "description": "a text_completion, or with stream: an SSE stream of them"},
                        **error_responses(404, 429, 503)})
async def completions(body: CompletionRequest, request: Request):
    state = get_state(request)
    state.require_engine()
    state.check_model(body.model)
    prompts: list[list[int]] = []
    prompt_texts: list[str | None] = []
    multi = len(body.prompt) > 1
    params = [f"prompt[{i}]" if multi else "prompt" for i in range(len(body.prompt))]
    for p, param in zip(body.prompt, params):
        if isinstance(p, str):
            ids = await state.encode_text(p, param)
            prompt_texts.append(p)
        else:
            ids = list(p)
            prompt_texts.append(None)
        prompts.append(ids)
    prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
    constraint, constraint_param = structured_outputs(body)
    samples = [_params(body, body.max_tokens, j, logprobs=body.logprobs, prompt_logprobs=prompt_lp,
                       structured_outputs=constraint) for j in range(body.n)]
    if body.echo:  # the prompt text that echo puts in front of the completion
        tok = state.require_engine().tokenizer
        prompt_texts = [t if t is not None else (tok.decode(ids, skip_special_tokens=False) if tok else "")
                        for t, ids in zip(prompt_texts, prompts)]
    if state.config.log_prompts:
        _remember(request, prompt=repr([t if t is not None else ids for t, ids in zip(prompt_texts, prompts)]))
    rid = request.state.request_id
    gen = Generation(state, request, [_model_prompt(state, body, ids) for ids in prompts], samples, rid, params,
                     constraint_param=constraint_param)
    await gen.start()
    created = int(time.time())
    model = state.model_name
    if body.stream:
        gen.stop_watching()
        events = _completion_stream(state, request, gen, body, prompts, prompt_texts, f"cmpl-{rid}", created, model)
        return EventStream(_sse_stream(gen, events), gen)

    n = len(gen.jobs)
    texts = [[] for _ in range(n)]
    lps: list[CompletionLogprobs | None] = [None] * n
    choice_states = _choice_states(state, body, prompts, prompt_texts)
    finish = [None] * n
    async for k, out in gen.outputs():
        piece, lp = choice_states[k].delta(out)
        texts[k].append(piece)
        lps[k] = _merge(lps[k], lp)
        if out.finished:
            finish[k] = out.outputs[0].finish_reason
    if body.logprobs is not None:
        lps = [lp or CompletionLogprobs() for lp in lps]
    choices = [CompletionChoice(index=k, text="".join(texts[k]), logprobs=lps[k], finish_reason=finish[k])
               for k in range(n)]
    if state.config.log_prompts:
        _remember(request, response=repr([c.text for c in choices]))
    resp = CompletionResponse(id=f"cmpl-{rid}", created=created, model=model, choices=choices, usage=_usage(gen))
    return JSONResponse(resp.model_dump())


def _choice_states(state, body, prompts, prompt_texts) -> list[_CompletionChoice]:
    """Choice index = prompt index * n + sample index."""
    return [_CompletionChoice(state, body, ids, text) for ids, text in zip(prompts, prompt_texts)
            for _ in range(body.n)]


async def _completion_stream(state: ServerState, request: Request, gen: Generation, body: CompletionRequest,
                             prompts, prompt_texts, cid: str, created: int, model: str) -> AsyncIterator[str]:
    include_usage = _include_usage(body)
    choice_states = _choice_states(state, body, prompts, prompt_texts)
    texts = [[] for _ in gen.jobs]

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        c = CompletionResponse(id=cid, created=created, model=model, choices=choices, usage=usage)
        return _sse(c, exclude=None if include_usage else {"usage"})

    try:
        async for k, out in gen.outputs():
            text, lp = choice_states[k].delta(out)
            if not (text or lp or out.finished):
                continue
            texts[k].append(text)
            yield chunk([CompletionChoice(index=k, text=text, logprobs=lp,
                                          finish_reason=out.outputs[0].finish_reason if out.finished else None)])
        if include_usage:
            yield chunk([], _usage(gen))
    finally:
        if state.config.log_prompts:
            _remember(request, response=repr(["".join(t) for t in texts]))
