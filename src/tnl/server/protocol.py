"""Request and response bodies (pydantic): the seed API, OpenAI's API, tokenize / detokenize.

Field names follow OpenAI (and vLLM for the extras top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, skip_special_tokens). Unknown fields are ignored, because OpenAI
clients send fields a server may not know; a known field with the wrong type is a 400
(numbers are strict: "5" is not 5, 1.0 is not an int, true is not 1).
"""
from __future__ import annotations

import re
import time
from collections import deque
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from tnl.config import DEFAULT_SYSTEM_PROMPT
from tnl.engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TOKENS_CAP,
)

# MAX_TOKENS_CAP (1,000,000): a max_tokens above it is a mistake, not a plan; it is refused
# (400) rather than clamped, so a client bug shows up at once.
SEED_MAX_NEW_TOKENS = 512            # the tutorial's api.py: model.generate(..., max_new_tokens=512)
COMPLETION_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 4096       # OpenAI has none; a state-space model has no context end to stop at
MAX_N = 128                          # choices per request (OpenAI's limit)

# A token id in a request. Its upper bound (below the model's vocab_size) is known only once the
# model is loaded: the app puts it into /openapi.json then, at every schema carrying this key
# (tnl.server.openapi.fill_in_server).
TOKEN_ID_KEY = "x-tnl-token-id"
TOKEN_ID = {"type": "integer", "minimum": 0, TOKEN_ID_KEY: True}
# A request's "model": the app puts the served model's name into /openapi.json at this key's schemas.
MODEL_KEY = "x-tnl-model"
NULL = {"type": "null"}
STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}


def _strict(default=None, **kw):
    return Field(default, strict=True, **kw)


def _number(default=None, **kw):
    return Field(default, strict=True, allow_inf_nan=False, **kw)


def _model(**kw):
    return Field(None, strict=True, min_length=1, json_schema_extra={MODEL_KEY: True}, **kw)


def exactly_one_of(*fields: str) -> dict:
    """A model's json_schema_extra for "exactly one of these fields, not null" (null counts as
    absent), which the model's validator enforces."""
    return {"anyOf": [{"required": [f], "properties": {f: {"not": NULL}, **{g: NULL for g in fields if g != f}}}
                      for f in fields]}


_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = frozenset({int, float, bool, type(None)})


def lone_surrogate(value: Any) -> str | None:
    """What is wrong with `value` (a field's JSON value, searched through its lists and objects,
    keys included) when a string in it holds a lone UTF-16 surrogate; None when none does. JSON
    can escape one ("\\ud800"), but it is half of a character, not text: UTF-8 and the tokenizer
    cannot take it. A loop, not recursion: the value may be nested as deep as json.loads goes."""
    todo = deque([(value, "")])   # breadth first: the shallowest one is named
    while todo:
        item, path = todo.popleft()
        if isinstance(item, str):
            m = None if item.isascii() else _SURROGATE.search(item)
            if m is not None:
                return (f"{path + ': ' if path else ''}a lone UTF-16 surrogate (\\u{ord(m.group()):04x}) at "
                        f"character {m.start()} is not text: in JSON a \\ud800-\\udbff escape must be "
                        f"followed by a \\udc00-\\udfff one")
        elif isinstance(item, dict):
            todo.extend((k, path) for k in item)
            todo.extend((v, f"{path}.{k}" if path else str(k)) for k, v in item.items())
        elif isinstance(item, list) and not _SCALARS.issuperset(map(type, item)):   # (fast for token ids)
            todo.extend((x, f"{path}[{i}]") for i, x in enumerate(item) if isinstance(x, (str, dict, list)))
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _text(cls, v):
        """Every string a client sends must be text: one check for every field, nested ones included."""
        problem = lone_surrogate(v)
        if problem is not None:
            raise ValueError(problem)
        return v


class StreamOptions(_Request):
    include_usage: bool = _strict(False)


class JsonSchemaFormat(_Request):
    """response_format's json_schema (OpenAI's shape)."""

    name: StrictStr | None = Field(None, max_length=256, description="the schema's name (not used)")
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(..., alias="schema", description="a JSON Schema the output must be valid "
                                                                    "against")
    strict: bool | None = _strict(None, description="accepted; the output always follows the schema")


class ResponseFormat(_Request):
    """OpenAI's response_format: plain text, any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [   # _needs_schema's schema
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {"required": ["json_schema"], "properties": {"type": {"const": "json_schema"}, "json_schema": {"not": NULL}}}]})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs json_schema: {'name': ..., 'schema': {...}}")
        return self


STRUCTURED_FIELDS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputsFields(_Request):
    """vLLM's structured_outputs: exactly one constraint (tnl.engine.sampling_params.StructuredOutputs)."""

    model_config = ConfigDict(json_schema_extra=exactly_one_of(*STRUCTURED_FIELDS))   # _one_constraint's schema

    json_: dict[str, Any] | StrictStr | None = Field(None, alias="json", description="a JSON Schema (an object, "
                                                                                     "or its JSON text)")
    regex: StrictStr | None = Field(None, min_length=1, description="a regular expression the whole output matches")
    choice: list[StrictStr] | None = Field(None, min_length=1, description="the output is exactly one of these")
    grammar: StrictStr | None = Field(None, min_length=1, description="an EBNF / GBNF grammar whose rule 'root' "
                                                                      "the output is")
    json_object: Literal[True] | None = Field(None, description="true: any JSON object")
    disable_any_whitespace: bool = _strict(False, description="JSON without whitespace between its tokens")

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [f for f in STRUCTURED_FIELDS if getattr(self, "json_" if f == "json" else f) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(STRUCTURED_FIELDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        return self


class SamplingFields(_Request):
    """Decoding options shared by /v1/chat/completions and /v1/completions."""

    model: str | None = _model(description="the served model name (see GET /v1/models); omitted: the served model")
    temperature: float | None = _number(None, ge=0, description="0: greedy; default 1")
    top_p: float | None = _number(None, gt=0, le=1)
    n: int = _strict(1, ge=1, le=MAX_N)
    stop: StrictStr | list[StrictStr] | None = Field(
        None, description=f"up to {MAX_STOPS} strings that end generation",
        json_schema_extra={"anyOf": [STOP, {"type": "array", "items": STOP, "maxItems": MAX_STOPS}, NULL]})
    seed: int | None = _strict(None, ge=-(2 ** 63), lt=2 ** 64)
    presence_penalty: float | None = _number(None, ge=-2, le=2)
    frequency_penalty: float | None = _number(None, ge=-2, le=2)
    stream: bool = _strict(False)
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Any] | None = Field(None, description="not supported: refused when non-empty",
                                              json_schema_extra={"anyOf": [{"type": "object", "maxProperties": 0},
                                                                           NULL]})
    # extras (vLLM's names)
    top_k: int | None = _strict(None, ge=-1, description="0 or -1: off")
    min_p: float | None = _number(None, ge=0, le=1)
    repetition_penalty: float | None = _number(None, gt=0, description="HF style; 1: off")
    stop_token_ids: list[StrictInt] | None = _strict(None, description="token ids that end generation",
                                                     json_schema_extra={"anyOf": [{"type": "array", "items": TOKEN_ID},
                                                                                  NULL]})
    ignore_eos: bool = _strict(False)
    skip_special_tokens: bool = _strict(True)
    # structured output: OpenAI's response_format, or vLLM's structured_outputs (not both)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:   # the per-step stop check and a stream's hold-back grow with it
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[dict[str, Any]] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                     "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
        NULL]})
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        """Content parts are joined with newlines (as the tokenizer's chat template does);
        only text parts are accepted."""
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {i} has type {part.get('type')!r}: only "
                                     f"{{'type': 'text', 'text': ...}} parts are supported")
                texts.append(part["text"])
            return "\n".join(texts)
        return v

    def as_template_message(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content or ""}


# response_format (other than text) and structured_outputs are two constraints: one at most
# (tnl.server.serving.structured_outputs refuses both)
ONE_CONSTRAINT = {"anyOf": [
    {"properties": {"structured_outputs": NULL}},
    {"properties": {"response_format": {"anyOf": [NULL, {"properties": {"type": {"const": "text"}}}]}}}]}


class ChatCompletionRequest(SamplingFields):
    # the schemas of _top_logprobs_needs_logprobs and of ONE_CONSTRAINT
    model_config = ConfigDict(json_schema_extra={"allOf": [{"anyOf": [
        {"properties": {"top_logprobs": {"enum": [0, None]}}},
        {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}]}, ONE_CONSTRAINT]})

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = _strict(None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = _strict(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool = _strict(False)
    top_logprobs: int | None = _strict(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = Field(None, description="not supported: refused when non-empty",
                                    json_schema_extra={"anyOf": [{"type": "array", "maxItems": 0}, NULL]})
    add_generation_prompt: bool = _strict(True)

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        if v:
            raise ValueError("tool calling is not supported by this server")
        return v

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(SamplingFields):
    # the schemas of _best_of (best_of absent, or 1 with n 1; best_of == n > 1 is accepted too: JSON
    # Schema cannot compare two fields) and of ONE_CONSTRAINT
    model_config = ConfigDict(json_schema_extra={"allOf": [{"anyOf": [
        {"properties": {"best_of": NULL}},
        {"properties": {"best_of": {"const": 1}, "n": {"const": 1}}}]}, ONE_CONSTRAINT]})

    prompt: Any = Field(..., description="a string, a list of strings, a list of token ids, "
                                         "or a list of token-id lists; none of them empty",
                        json_schema_extra={"anyOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                            {"type": "array", "items": TOKEN_ID, "minItems": 1},
                            {"type": "array", "items": {"type": "array", "items": TOKEN_ID, "minItems": 1},
                             "minItems": 1}]})
    max_tokens: int = _strict(COMPLETION_DEFAULT_MAX_TOKENS, ge=0, le=MAX_TOKENS_CAP,
                              description="0 with echo and logprobs: score the prompt only")
    echo: bool = _strict(False)
    logprobs: int | None = _strict(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(None, description="not supported: refused when non-empty",
                               json_schema_extra={"anyOf": [{"type": "string", "maxLength": 0}, NULL]})
    best_of: int | None = _strict(None, ge=1, description="only equal to n")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        """Normalize to a list of prompts, each a str or a list of token ids."""
        what = "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists"
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not v:
            raise ValueError(f"{what}; got {'an empty list' if v == [] else type(v).__name__}")

        def is_id(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if all(is_id(x) for x in v):
            return [v]
        if all(isinstance(x, str) for x in v):
            return list(v)
        if all(isinstance(x, list) and all(is_id(t) for t in x) for x in v):
            return list(v)
        raise ValueError(what)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("suffix (insertion) is not supported by this server")
        return v

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self


class SeedRequest(_Request):
    """POST / (the tutorial's api.py): {"prompt": "你好"} plus optional extras."""

    prompt: str = _strict(..., min_length=1)
    history: list[Any] | None = Field(
        None, description="earlier turns: [[user, assistant], ...] or [{'role', 'content'}, ...]",
        json_schema_extra={"anyOf": [{"type": "array", "items": {"anyOf": [
            {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
            {"type": "object", "required": ["role", "content"],
             "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}]}},
            NULL]})
    max_new_tokens: int = _strict(SEED_MAX_NEW_TOKENS, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = _number(0.0, ge=0, description="default 0: greedy, like the tutorial's model.generate")
    top_p: float = _number(1.0, gt=0, le=1)

    @field_validator("history")
    @classmethod
    def _history(cls, v):
        """Normalize to a list of {'role', 'content'} messages."""
        if v is None:
            return []
        out: list[dict[str, str]] = []
        for i, turn in enumerate(v):
            if isinstance(turn, (list, tuple)):
                if len(turn) != 2 or not all(isinstance(x, str) for x in turn):
                    raise ValueError(f"turn {i} must be a [user, assistant] pair of strings")
                out.append({"role": "user", "content": turn[0]})
                out.append({"role": "assistant", "content": turn[1]})
            elif isinstance(turn, dict):
                role, content = turn.get("role"), turn.get("content")
                if role not in ("system", "user", "assistant") or not isinstance(content, str):
                    raise ValueError(f"turn {i} must be {{'role': 'system'|'user'|'assistant', "
                                     f"'content': str}}")
                out.append({"role": role, "content": content})
            else:
                raise ValueError(f"turn {i} must be a [user, assistant] pair or a {{role, content}} message")
        return out

    def messages(self) -> list[dict[str, str]]:
        history = list(self.history or [])
        system = [] if history and history[0]["role"] == "system" else \
            [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
        return system + history + [{"role": "user", "content": self.prompt}]


class TokenizeRequest(_Request):
    model_config = ConfigDict(json_schema_extra=exactly_one_of("prompt", "messages"))   # _one_input's schema

    model: str | None = _model()
    prompt: str | None = _strict(None)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = _strict(True)
    add_generation_prompt: bool = _strict(True)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'messages' (a chat)")
        return self


class DetokenizeRequest(_Request):
    model: str | None = _model()
    tokens: list[StrictInt] = _strict(..., json_schema_extra={"items": TOKEN_ID})


# ---- responses --------------------------------------------------------------------------------

class SeedResponse(BaseModel):
    response: str
    status: int = 200
    time: str = Field(..., description="local time, 'YYYY-MM-DD HH:MM:SS'")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens taken from the prompt-state cache, not computed")


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tnl"
    root: str | None = None
    max_model_len: int | None = Field(None, description="null: no context limit (the state has a fixed size)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """GET /tokenizer_info: the served tokenizer's settings in tokenizer_config.json's shape, as
    vLLM's endpoint gives them. lm-evaluation-harness's remote tokenizer (lm_eval.utils.
    RemoteTokenizer) reads eos_token (it must be present), bos_token, pad_token and
    chat_template, and turns a token string into its id through POST /tokenize."""

    tokenizer_class: str = Field(..., description="the server's tokenizer class (SentencePiece)")
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = Field(..., description="whether encoding text adds bos_token in front "
                                                 "(POST /tokenize with add_special_tokens: true, "
                                                 "and string prompts)")
    add_eos_token: bool
    chat_template: str | None = Field(None, description="the Jinja template /v1/chat/completions renders")


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "shutting_down", "error"]
    model: str | None = Field(None, description="the served model name (with 'ok')")
    message: str | None = Field(None, description="what went wrong (with 'error')")


# ---- errors -----------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str = Field(..., description="what was wrong, and what was expected")
    type: str = Field(..., description="invalid_request_error, authentication_error, not_found_error, "
                                       "rate_limit_error, service_unavailable or internal_error")
    param: str | None = Field(None, description="the request field at fault, e.g. 'messages[0].content'")
    code: int = Field(..., description="the HTTP status")


class ErrorResponse(BaseModel):
    """Every error response, in OpenAI's shape (tnl.server.errors.error_body)."""

    error: ErrorDetail


# Why each error status is sent, as /openapi.json documents it (every one with an ErrorResponse).
ERROR_STATUSES = {
    400: "invalid request: a field (error.param names it), a body that is not JSON, or a Host this server "
         "does not answer to",
    401: "missing or wrong API key (send 'Authorization: Bearer <key>')",
    403: "a cross-site POST whose body is not JSON",
    404: "no such model (see GET /v1/models)",
    408: "the request's headers or body did not arrive in time",
    413: "the request body is too large",
    429: "the server is busy (every slot taken and the waiting queue full); retry after Retry-After seconds",
    503: "the model is loading or failed to load, the server is shutting down, or it has all the connections "
         "it takes",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int, dict]:
    """FastAPI `responses=` for these error statuses."""
    return {status: {"model": ErrorResponse, "description": ERROR_STATUSES[status],
                     **({"headers": RETRY_AFTER} if status in (429, 503) else {})} for status in statuses}


def sse_content(chunk: type[BaseModel]) -> dict:
    """The other body of a 200 from /v1/chat/completions and /v1/completions: with stream: true,
    Server-Sent Events (in OpenAPI 3.1 the schema is one event's)."""
    data = (f"a {chunk.__name__} as JSON (an ErrorResponse if the stream fails after it began); the last "
            f"event's data is [DONE]")
    return {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": data}, "event": {"type": "string"}}}}}
