"""State files over HTTP: save a conversation's recurrent state, load it into this or another
server of the same model, continue from it (tnl.engine.state_file says what a file holds).

    POST   /v1/state/export   {"prompt" | "token_ids" | "messages"} -> the file (application/octet-stream)
    POST   /v1/state/import   the file as the body -> {"tokens", "fingerprint"}; the state is pinned
    DELETE /v1/state/pins     -> {"unpinned": n}

The server never touches tensors: the engine front (AsyncEngine) parses and writes the files,
off the event loop and the engine thread. tnl.engine.state_file (its error types) is imported in
the handlers, since it loads torch and the server's modules import without it. Every refusal is a 4xx in the OpenAI error shape, and
a refused import caches nothing.
"""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from tnl.server.errors import APIError
from tnl.server.protocol import (
    NULL,
    TOKEN_ID,
    ChatMessage,
    ErrorResponse,
    _model,
    _Request,
    _strict,
    error_responses,
    exactly_one_of,
)
from tnl.server.serving import Generation, get_state, sampling_params

log = logging.getLogger(__name__)
router = APIRouter(tags=["state files"])

OCTET_STREAM = "application/octet-stream"
BINARY = {"schema": {"type": "string", "format": "binary"}}
STATE_HEADERS = {
    "X-Tnl-State-Tokens": {"description": "the tokens the state comes after", "schema": {"type": "integer"}},
    "X-Tnl-State-Fingerprint": {"description": "the model's fingerprint", "schema": {"type": "string"}}}
# the statuses of these routes alone (protocol.error_responses documents the shared ones)
STATE_ERRORS = {
    409: "the state file was computed by another model (its fingerprint differs from this server's model)",
    501: "the prompt-state cache is off (--no-enable-prefix-caching): states are exported from it and imported "
         "into it",
    507: "the prompt-state cache cannot keep the state: its budget is full of pinned states (DELETE /v1/state/pins)",
}


def state_errors(*statuses: int) -> dict[int, dict]:
    return {s: {"model": ErrorResponse, "description": STATE_ERRORS[s]} for s in statuses}


class StateExportRequest(_Request):
    model_config = ConfigDict(json_schema_extra=exactly_one_of("prompt", "token_ids", "messages"))   # _one_input's

    model: str | None = _model(description="the served model name (see GET /v1/models); omitted: the served model")
    prompt: StrictStr | None = _strict(None, min_length=1, description="text, encoded as /v1/completions encodes "
                                                                       "it (with BOS)")
    token_ids: list[StrictInt] | None = _strict(None, min_length=1, json_schema_extra={"anyOf": [
        {"type": "array", "items": TOKEN_ID, "minItems": 1}, NULL]})
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="a chat, through the chat template")
    add_generation_prompt: bool = _strict(False, description="messages only: end with the assistant turn's opening "
                                                             "(off: the next turn's prompt starts with these tokens)")

    @field_validator("token_ids")
    @classmethod
    def _ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _one_input(self):
        if sum(x is not None for x in (self.prompt, self.token_ids, self.messages)) != 1:
            raise ValueError("give exactly one of 'prompt' (a string), 'token_ids' (a list of token ids) or "
                             "'messages' (a chat)")
        return self


class StateImportResponse(BaseModel):
    tokens: int = Field(..., description="the tokens the state comes after; prompts starting with them hit")
    fingerprint: str = Field(..., description="the model's fingerprint (config and weights)")


class StateUnpinResponse(BaseModel):
    unpinned: int = Field(..., description="how many states were pinned")


async def _prefix_ids(state, body: StateExportRequest) -> tuple[list[int], str]:
    """The request's prefix as token ids, tokenized in a worker thread, and the field it came from."""
    if body.token_ids is not None:
        return body.token_ids, "token_ids"
    if body.prompt is not None:
        return await asyncio.to_thread(state.tokenizer("prompt").encode, body.prompt), "prompt"
    tok = state.tokenizer("messages")
    messages = [m.as_template_message() for m in body.messages]
    try:
        ids = await asyncio.to_thread(tok.apply_chat_template, messages,
                                      add_generation_prompt=body.add_generation_prompt, tokenize=True)
    except ValueError as e:  # the template's raise_exception(), or a message it cannot render
        raise APIError(f"messages: {e}", 400, "messages") from None
    return ids, "messages"


def _state_cache_error(e) -> APIError:
    # off: this server cannot do it (501); full of pinned states: 507 until some are unpinned
    return APIError(str(e), 501 if e.off else 507)


@router.post("/v1/state/export", response_class=Response,
             responses={200: {"content": {OCTET_STREAM: BINARY}, "headers": STATE_HEADERS,
                              "description": "the state file (safetensors)"},
                        **error_responses(404, 429, 503), **state_errors(501, 507)})
async def export_state(body: StateExportRequest, request: Request):
    """The model's state after a prefix, as a state file (safetensors). Computed through the
    prompt-state cache: from its longest cached prefix, or not at all when it holds the whole one."""
    from tnl.engine.state_file import StateCacheError

    state = get_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    ids, param = await _prefix_ids(state, body)
    # one greedy token: the request keeps the state at its prompt's end with the logits after it
    # (a max_tokens 0 request scores its prompt and skips the cache)
    gen = Generation(state, request, [ids], [sampling_params(dict(max_tokens=1, temperature=0))],
                     request.state.request_id, prompt_params=[param])
    await gen.start()
    async for _ in gen.outputs():
        pass
    try:
        data = await engine.export_state(ids)
    except StateCacheError as e:
        raise _state_cache_error(e) from None
    n = len(ids)
    return Response(data, media_type=OCTET_STREAM, headers={
        "X-Tnl-State-Tokens": str(n), "X-Tnl-State-Fingerprint": engine.fingerprint,
        "Content-Disposition": f'attachment; filename="tnl-state-{n}.safetensors"'})


@router.post("/v1/state/import", response_model=StateImportResponse,
             openapi_extra={"requestBody": {"required": True, "content": {OCTET_STREAM: BINARY}}},
             responses={**error_responses(503), **state_errors(409, 501, 507)})
async def import_state(request: Request) -> StateImportResponse:
    """A state file (POST /v1/state/export's answer, from this server or another of the same
    model) as the body: checked, then pinned in the prompt-state cache, so that every prompt that
    starts with its tokens continues from it. 409: another model's state; 413: larger than any
    state of this model; 400: anything else wrong with the file."""
    from tnl.engine import state_file

    state = get_state(request)
    engine = state.require_engine()
    cap = state_file.max_file_bytes(engine.model_config)
    too_large = (f"the body is larger than any state file of this model ({cap} bytes at most): send a file that "
                 f"POST /v1/state/export made")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:   # before reading a byte of it
        raise APIError(too_large, 413, headers={"Connection": "close"})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise APIError(too_large, 413, headers={"Connection": "close"})
        chunks.append(chunk)
    if not size:
        raise APIError(f"the body is empty: send a state file (POST /v1/state/export's answer) as {OCTET_STREAM}", 400)
    try:
        n = await engine.import_state(b"".join(chunks))
    except state_file.WrongModelState as e:
        raise APIError(str(e), 409) from None
    except state_file.StateFileTooLarge as e:
        raise APIError(str(e), 413) from None
    except state_file.StateFileError as e:
        raise APIError(f"not a usable state file: {e}", 400) from None
    except state_file.StateCacheError as e:
        raise _state_cache_error(e) from None
    log.info("request %s: imported a state of %d tokens (pinned)", request.state.request_id, n)
    return StateImportResponse(tokens=n, fingerprint=engine.fingerprint)


@router.delete("/v1/state/pins", response_model=StateUnpinResponse, responses=error_responses(503))
async def unpin_states(request: Request) -> StateUnpinResponse:
    """Unpin every imported state: the cache may evict them again, least recently used first."""
    engine = get_state(request).require_engine()
    return StateUnpinResponse(unpinned=await engine.unpin_states())
