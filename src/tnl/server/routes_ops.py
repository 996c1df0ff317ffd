"""Operations: /health, /metrics, /tokenize, /detokenize, /tokenizer_info."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tnl.server.errors import APIError
from tnl.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    error_responses,
)
from tnl.server.serving import get_state

router = APIRouter(tags=["operations"])


@router.get("/health", responses={200: {"model": HealthResponse},
                                  503: {"model": HealthResponse,
                                        "description": "loading, failed to load, or shutting down"}})
async def health(request: Request):
    """200 once the model is loaded and the engine runs; 503 before (and after a load failure)."""
    state = get_state(request)
    if state.load_error is not None:
        return JSONResponse({"status": "error", "message": state.load_error}, status_code=503)
    if state.shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    error = getattr(state.engine, "error", None)
    if error is not None:
        return JSONResponse({"status": "error", "message": f"engine stopped: {error}"}, status_code=503)
    return {"status": "ok", "model": state.model_name}


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    """Prometheus text format."""
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(404, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """{"prompt": str} or {"messages": [...]} (through the chat template) -> token ids."""
    state = get_state(request)
    state.check_model(body.model)
    if body.messages is not None:
        ids = await state.encode_chat([m.as_template_message() for m in body.messages], "messages",
                                      body.add_generation_prompt)
    else:
        ids = await state.encode_text(body.prompt, "prompt", body.add_special_tokens, allow_empty=True)
    return TokenizeResponse(tokens=ids, count=len(ids))


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(404, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    state.check_model(body.model)
    tok = state.tokenizer("tokens")
    V = min(state.vocab_size, tok.vocab_size)
    for i, t in enumerate(body.tokens):
        if not 0 <= t < V:
            raise APIError(f"tokens: token id {t} at position {i} is outside the vocabulary [0, {V})", 400, "tokens")
    return DetokenizeResponse(prompt=tok.decode(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse, responses=error_responses(503))
async def tokenizer_info(request: Request) -> TokenizerInfoResponse:
    """The tokenizer's special tokens, BOS / EOS policy and chat template (vLLM's endpoint; what
    lm-evaluation-harness's `tokenizer_backend=remote` reads)."""
    tok = get_state(request).tokenizer(None)
    pad = tok.pad_token_id
    return TokenizerInfoResponse(tokenizer_class=type(tok).__name__, bos_token=tok.bos_token,
                                 eos_token=tok.eos_token, pad_token=None if pad is None else tok.id_to_piece(pad),
                                 add_bos_token=tok.add_bos_token, add_eos_token=tok.add_eos_token,
                                 chat_template=tok.chat_template)
