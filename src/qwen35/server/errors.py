"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

Every way a request can fail ends here: `APIError` raised by the handlers, FastAPI's validation errors
(malformed JSON, missing or mistyped fields: 400), Starlette's HTTP errors (unknown route 404, wrong method
405), and anything unexpected (500, logged with its traceback; the server keeps running).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("qwen35.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error to answer with: HTTP `status`, a human `message`, the offending `param` and a machine `code`."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None,  # noqa: A002
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ------------------------------------------------------------------------------------------ schema (docs)
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


#: the error responses every route can give (for /openapi.json)
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _doc("Missing or wrong API key (when the server was started with --api-key)"),
    500: _doc("Internal error (the request failed; the server goes on)"),
}
#: and those of the routes that take a JSON body
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _doc("Malformed JSON, missing or invalid fields, values out of range, prompt longer than the context, "
              "media not allowed"),
    404: _doc("Unknown model"),
    413: _doc("Request body too large"),
    **COMMON_ERRORS,
}


# ------------------------------------------------------------------------------------------ handlers
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_tag(part: object) -> bool:
    """Pydantic puts the union member tried in the location (`prompt.list[str][0]`): not a field name."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in _TYPE_TAGS)


def _loc_to_param(loc: tuple | list) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header") and not _is_tag(p)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """A readable message, the first offending field and a code for FastAPI's validation errors."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid_request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"the request body is not valid JSON: {ctx.get('error', 'parse error')}", None, "invalid_json"
    msgs: list[str] = []
    for e in errors:
        param = _loc_to_param(e.get("loc", ()))
        msg = str(e.get("msg", "invalid value"))
        line = f"{param}: {msg}" if param else msg
        if line not in msgs:
            msgs.append(line)
    more = f" (and {len(msgs) - 5} more)" if len(msgs) > 5 else ""
    msgs = msgs[:5]
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return "; ".join(msgs) + more, _loc_to_param(first.get("loc", ())), code


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param, code = validation_message(exc)
    return error_response(APIError(message, 400, param=param, code=code))


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        message = f"no route {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    headers = getattr(exc, "headers", None)
    return error_response(APIError(message, status), headers=dict(headers) if headers else None)


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(APIError(f"internal error: {type(exc).__name__}", 500))


__all__ = ["APIError", "BODY_ERRORS", "COMMON_ERRORS", "ErrorResponse", "error_body", "error_response"]
