"""The OpenAPI schema made to tell the truth: every status the middlewares and routes answer,
with its error body; the served model's name and token-id range; integer bounds; and the Allow
header of a 405."""
from __future__ import annotations

import copy
import logging

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from tnl.server.middleware import APIKeyMiddleware
from tnl.server.protocol import ERROR_STATUSES, MODEL_KEY, TOKEN_ID_KEY, ErrorResponse
from tnl.server.serving import ServerState

log = logging.getLogger(__name__)


def allow_every_method(app: FastAPI, routes: list) -> None:
    """A 405's Allow header lists every method of its path (among `routes`). Starlette's names
    only the methods of the first route with that path: OPTIONS / said 'Allow: GET' though POST /
    exists."""
    methods: dict[str, set[str]] = {}
    for route in routes:
        if isinstance(route, APIRoute):
            methods.setdefault(route.path, set()).update(route.methods)
    http_error = app.exception_handlers[StarletteHTTPException]

    async def method_not_allowed(request: Request, exc: StarletteHTTPException):
        allowed = methods.get(request.url.path)
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))}
        return await http_error(request, exc)

    app.add_exception_handler(405, method_not_allowed)


def middleware_statuses(path: str, method: str, has_body: bool, keyed: bool) -> list[int]:
    """The error statuses that the connection (launch.GuardedHTTP) and the middlewares can send for
    an operation before its route runs."""
    statuses = [400,               # a Host this server does not answer to (SiteGuardMiddleware)
                408,               # headers (GuardedHTTP) or a body (BodyTimeoutMiddleware) too slow
                503]               # past --max-connections (GuardedHTTP), or shutting down
    if method == "post":
        statuses.append(403)       # a cross-site POST of a body that is not JSON (SiteGuardMiddleware)
    if has_body:
        statuses.append(413)       # a body too large
    if keyed and not APIKeyMiddleware.is_open({"path": path, "method": method.upper()}):
        statuses.append(401)
    return statuses


def document_statuses(schema: dict, keyed: bool) -> None:
    """Every error status an operation can answer, each with the ErrorResponse model. A body
    that fails validation gets a 400 (errors.py), not FastAPI's 422 HTTPValidationError."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    if "ErrorResponse" not in schemas:
        error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error.pop("$defs", {}))
        schemas["ErrorResponse"] = error
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            statuses = middleware_statuses(path, method, "requestBody" in op, keyed)
            for status in statuses:
                responses.setdefault(str(status), {
                    "description": ERROR_STATUSES[status],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
            if 401 in statuses:
                op["security"] = [{"apiKey": []}]
            op["responses"] = dict(sorted(responses.items()))
    if keyed:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer",
                                                    "description": "--api-key: 'Authorization: Bearer <key>'"}}


def fill_in_server(node, model_name: str, vocab_size: int | None) -> None:
    """What only this server knows, put into the schemas under `node` that protocol.py marks: the
    served model's name (the one "model" accepted) and, once the model is loaded (`vocab_size`),
    the bound of token ids."""
    if isinstance(node, dict):
        if node.get(MODEL_KEY):
            node["anyOf"] = [{"type": "string", "enum": [model_name]}, {"type": "null"}]
        if node.get(TOKEN_ID_KEY) and vocab_size is not None:
            node["maximum"] = vocab_size - 1
        for value in node.values():
            fill_in_server(value, model_name, vocab_size)
    elif isinstance(node, list):
        for value in node:
            fill_in_server(value, model_name, vocab_size)


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def int_bounds(node) -> None:
    """Whole bounds under `node` written as integers again: FastAPI's OpenAPI model stores every
    bound as a float, and a fuzzer then steps below the seed's 2**64 in float arithmetic."""
    if isinstance(node, dict):
        for key in BOUNDS:
            if isinstance(node.get(key), float) and node[key].is_integer():
                node[key] = int(node[key])
        for value in node.values():
            int_bounds(value)
    elif isinstance(node, list):
        for value in node:
            int_bounds(value)


def install_openapi(app: FastAPI, state: ServerState) -> None:
    """/openapi.json says what this server answers, so that generated clients and fuzzers can
    trust it: every error status with its ErrorResponse (the routes declare theirs with
    `responses=`, document_statuses adds the middlewares'), the request constraints the server
    enforces (protocol.py), the served model's name, and token ids bounded by the vocabulary once
    the model is loaded (the schema is kept from then on; before, it is rebuilt on each request)."""
    built: dict | None = None

    def openapi() -> dict:
        nonlocal built
        if built is not None:
            return built
        schema = copy.deepcopy(FastAPI.openapi(app))
        document_statuses(schema, bool(state.config.api_key))
        int_bounds(schema)
        vocab = None
        if state.ready:
            engine = state.engine
            vocab = engine.model_config.vocab_size
            if engine.tokenizer is not None:   # /detokenize decodes only ids both know
                vocab = min(vocab, engine.tokenizer.vocab_size)
            built = schema
        fill_in_server(schema, state.model_name, vocab)
        return schema

    app.openapi = openapi
