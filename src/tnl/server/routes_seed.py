"""The seed tutorial's API, unchanged for its users, and the web chat page.

POST / takes {"prompt": "你好"} with any content type (the tutorial's api.py reads the body
with `await request.json()`) and answers, compact and in this key order,
{"response":"...","status":200,"time":"YYYY-MM-DD HH:MM:SS"} (local time, after generation).
The prompt goes through the chat template as [system DEFAULT_SYSTEM_PROMPT, user prompt] (tnl.config),
and generation is greedy with max_new_tokens=512, as the tutorial's `model.generate` is.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import ValidationError

from tnl.server.errors import APIError, validation_message
from tnl.server.protocol import SeedRequest, SeedResponse, error_responses
from tnl.server.serving import Generation, get_state, sampling_params

log = logging.getLogger(__name__)
router = APIRouter(tags=["seed API"])

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
INDEX_HTML = os.path.join(STATIC_DIR, "index.html")

MISSING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tnl</title></head>
<body>
<h1>tnl is running</h1>
<p>The web chat page (<code>tnl/server/static/index.html</code>) is missing from this install.</p>
<p>The API works: <code>curl -X POST http://HOST:PORT -d '{"prompt": "你好"}'</code>,
the OpenAI API under <a href="/v1/models">/v1</a>, and its documentation at <a href="/docs">/docs</a>.</p>
</body></html>
"""


@router.get("/", response_class=HTMLResponse, summary="The web chat page")
async def chat_page():
    if os.path.isfile(INDEX_HTML):
        return FileResponse(INDEX_HTML, media_type="text/html; charset=utf-8")
    return HTMLResponse(MISSING_PAGE)


@router.post("/", response_model=SeedResponse, summary="Chat, the seed tutorial's way",
             responses=error_responses(429, 503),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": SeedRequest.model_json_schema()}}}})
async def seed_generate(request: Request):
    state = get_state(request)
    try:
        raw = await request.json()
    except RecursionError:   # json.loads recurses once per level of nesting
        raise APIError('malformed JSON body: nested too deeply; send a JSON object like {"prompt": "你好"}',
                       400) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f'malformed JSON body ({e}); send a JSON object like {{"prompt": "你好"}}', 400) from None
    if not isinstance(raw, dict):
        raise APIError(f'the body must be a JSON object like {{"prompt": "你好"}}, got {type(raw).__name__}', 400)
    try:
        body = SeedRequest.model_validate(raw)
    except ValidationError as e:
        message, param = validation_message(e.errors(include_url=False))
        raise APIError(message, 400, param) from None
    state.require_engine()
    messages = body.messages()
    ids = await state.encode_chat(messages, "prompt")
    params = sampling_params(dict(max_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p))
    boundaries = await asyncio.to_thread(state.tokenizer("prompt").chat_boundaries, messages, ids)
    gen = Generation(state, request, [ids], [params], request.state.request_id, boundaries=[boundaries])
    await gen.start()
    parts = [out.outputs[0].text async for _, out in gen.outputs()]
    response = "".join(parts)
    if state.config.log_prompts:
        request.state.log_prompt = body.prompt
        request.state.log_response = response
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return JSONResponse({"response": response, "status": 200, "time": now})

