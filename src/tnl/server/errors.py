"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every client mistake becomes a 4xx naming the field at fault (`param`); anything unexpected
becomes a 500 with a generic message while the traceback goes to the log.
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tnl.server.protocol import lone_surrogate

log = logging.getLogger(__name__)

ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request the server refuses. `param` names the request field at fault, if one is."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers


def printable(text: str) -> str:
    """`text` with what UTF-8 cannot carry (lone UTF-16 surrogates, which JSON can escape and
    error messages echo) written as escapes: '\\ud800' shows as the six characters \\ud800."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """The error JSON; it always renders, whatever the message echoes."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "internal_error")
    return {"error": {"message": printable(message), "type": kind,
                      "param": None if param is None else printable(param), "code": status}}


def error_response(message: str, status: int = 400, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)


def loc_to_param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; pydantic's union-branch
    labels (e.g. 'list[int]', 'function-after[...]') are dropped."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or "(" in part or part in ("str", "int", "float", "bool", "list", "dict"):
            continue
        else:
            out += ("." if out else "") + part
    return out or None


def _short(value, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    except RecursionError:   # JSON nested nearly as deep as json.loads goes
        text = f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else text[:limit] + "..."


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message for pydantic errors and the param of the first one."""
    parts = []
    first_param = None
    seen = set()
    for err in errors:
        param = loc_to_param(tuple(err.get("loc", ())))
        kind = err.get("type", "")
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            return f"malformed JSON body: {ctx.get('error', err.get('msg'))}", None
        msg = err.get("msg", "invalid value")
        if kind == "string_unicode":   # pydantic's own check of a constrained str; one message for both
            msg = lone_surrogate(err.get("input")) or msg
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if kind == "missing":
            text = f"{param}: field required" if param else "request body is required"
        elif param:
            got = f" (got {_short(err['input'])})" if "input" in err and kind not in ("extra_forbidden",) else ""
            text = f"{param}: {msg}{got}"
        else:
            text = f"request body: {msg}"
        if text in seen:
            continue
        seen.add(text)
        parts.append(text)
        if first_param is None:
            first_param = param
    return "; ".join(parts[:5]) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.message, exc.status, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        content_type = request.headers.get("content-type", "")
        body_not_json = any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in (
            "model_attributes_type", "dict_type") for e in errors)
        if body_not_json and content_type and "json" not in content_type.split(";")[0]:
            # curl -d without -H sends a form type. Only the tutorial's POST / reads JSON whatever the
            # type; here a JSON type is required, which also makes browsers preflight cross-site posts.
            return error_response(f"the body must be a JSON object sent with 'Content-Type: application/json' "
                                  f"(got '{content_type}')", 400, None)
        message, param = validation_message(errors)
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(detail, exc.status_code, None, getattr(exc, "headers", None))
