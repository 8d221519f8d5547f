"""The FastAPI application: routes, API-key check, body size limit, HTTP metrics, OpenAPI description.

    app = build_app(llm, ServerConfig(served_model_name="qwen3.5", api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The engine thread starts with the app (lifespan) and stops after the in-flight requests drained.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen35.server import errors
from qwen35.server.anthropic import anthropic_error_body, anthropic_router, is_anthropic_path
from qwen35.server.chat import ChatHandler
from qwen35.server.completions import CompletionHandler
from qwen35.server.errors import BODY_ERRORS, COMMON_ERRORS, APIError
from qwen35.server.metrics import CONTENT_TYPE
from qwen35.server.protocol import (
    SSE_DESCRIPTION,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    ModelCard,
    ModelList,
    StreamError,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    VersionResponse,
)
from qwen35.server.responses import responses_router
from qwen35.server.serving import ServerConfig, Serving, dumps, json_response
from qwen35.server.tokenization import TokenizationHandler


# ------------------------------------------------------------------------------------------ ASGI middlewares
async def _send_error(send: Send, err: APIError, headers: list[tuple[bytes, bytes]] = (), path: str = "") -> None:
    body = dumps(anthropic_error_body(err) if is_anthropic_path(path) else err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class HTTPMetrics:
    """Counts answered requests by method, route template and status (outermost layer)."""

    def __init__(self, app: ASGIApp, serving: Serving):
        self.app, self.serving = app, serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.serving.metrics.http_requests.inc(1, scope.get("method", ""), path, str(status["code"] or 500))


class APIKeyCheck:
    """`Authorization: Bearer KEY` or `x-api-key: KEY` (what Anthropic's clients send) on every route but /health,
    compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.expected_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            bearer = key = b""
            for k, v in scope.get("headers", ()):
                if k == b"authorization" and not bearer:
                    bearer = v
                elif k == b"x-api-key" and not key:
                    key = v
            # both compared (`|`, no short cut): the time taken says nothing about which header matched
            if not (hmac.compare_digest(bearer, self.expected) | hmac.compare_digest(key, self.expected_key)):
                msg = "missing API key (send Authorization: Bearer KEY or x-api-key: KEY)" if not (bearer or key) \
                    else "invalid API key"
                await _send_error(send, APIError(msg, 401, code="invalid_api_key"),
                                  [(b"www-authenticate", b"Bearer")], scope.get("path", ""))
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over `max_bytes` with a 413 (declared length or counted while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(f"the request body is larger than {self.max_bytes} bytes", 413,
                             code="request_too_large")
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    await _send_error(send, APIError("invalid Content-Length", 400, code="invalid_request"))
                    return
                if declared > self.max_bytes:
                    await _send_error(send, too_large, path=scope.get("path", ""))
                    return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await _send_error(send, too_large, path=scope.get("path", ""))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------ the app
def build_app(llm: Any, config: ServerConfig | None = None) -> ASGIApp:
    """The ASGI app serving `llm` (a `qwen35.LLM`, or anything with `.engine`, `.tokenizer`,
    `.default_sampling_params`). The returned object has `.state.serving` (the `Serving`) and `.fastapi`."""
    config = config or ServerConfig()
    serving = Serving(llm, config)
    chat = ChatHandler(serving)
    completions = CompletionHandler(serving)
    tokenization = TokenizationHandler(serving)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        serving.async_engine.start()
        try:
            yield
        finally:
            await serving.async_engine.shutdown(config.drain_timeout_s)

    from qwen35 import __version__ as version

    app = FastAPI(title="qwen35 OpenAI-compatible API", version=str(version), lifespan=lifespan,
                  description="Chat completions, completions and models for the Qwen3.5 family, as OpenAI's API "
                              "(plus vLLM's sampling extras and a thinking budget).")
    app.state.serving = serving
    app.add_exception_handler(APIError, errors.api_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_error_handler)
    app.add_exception_handler(Exception, errors.internal_error_handler)

    def streamed(model: Any, chunk: Any) -> dict[int | str, dict[str, Any]]:
        event = {"type": "object", "required": ["data"], "description": SSE_DESCRIPTION,
                 "properties": {"event": {"type": "string"},
                                "data": {"description": f"a {chunk.__name__} (or a StreamError) as JSON, or "
                                                        f"[DONE] at the end",
                                         "anyOf": [{"const": "[DONE]"},
                                                   {"type": "string", "contentMediaType": "application/json",
                                                    "contentSchema": {"anyOf": [
                                                        {"$ref": f"#/components/schemas/{chunk.__name__}"},
                                                        {"$ref": "#/components/schemas/StreamError"}]}}]}}}
        return {200: {"model": model, "description": "The response (JSON), or with stream: true an event stream",
                      "content": {"text/event-stream": {"schema": event}}},
                **BODY_ERRORS}

    @app.post("/v1/chat/completions", response_model=None,
              responses=streamed(ChatCompletionResponse, ChatCompletionChunk), summary="Create a chat completion",
              tags=["OpenAI"])
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat.create(body, request)

    @app.post("/v1/completions", response_model=None, responses=streamed(CompletionResponse, CompletionChunk),
              summary="Create a completion", tags=["OpenAI"])
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.create(body, request)

    app.include_router(anthropic_router(serving))  # /v1/messages, /v1/messages/count_tokens
    app.include_router(responses_router(serving))  # /v1/responses (+ GET / DELETE of stored ones)

    @app.get("/v1/models", response_model=ModelList, responses={**COMMON_ERRORS}, summary="List the models",
             tags=["OpenAI"])
    async def list_models() -> Response:
        return json_response({"object": "list", "data": [serving.model_card()]})

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses={404: BODY_ERRORS[404], **COMMON_ERRORS}, summary="Describe a model", tags=["OpenAI"])
    async def get_model(model_id: str) -> Response:
        if model_id not in serving.model_names:
            serving.check_model(model_id)
        return json_response(serving.model_card())

    @app.post("/tokenize", response_model=TokenizeResponse, responses=BODY_ERRORS, tags=["Tokenizer"],
              summary="Tokenize a prompt or a conversation (vLLM's shape)")
    async def tokenize(body: TokenizeRequest) -> Response:
        return json_response(await tokenization.tokenize(body))

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=BODY_ERRORS, tags=["Tokenizer"],
              summary="Token ids back to text (vLLM's shape)")
    async def detokenize(body: DetokenizeRequest) -> Response:
        return json_response(tokenization.detokenize(body))

    @app.get("/tokenizer_info", response_model=TokenizerInfo, responses={**COMMON_ERRORS}, tags=["Tokenizer"],
             summary="The tokenizer's special tokens and chat template (vLLM's shape)")
    async def tokenizer_info() -> Response:
        return json_response(tokenization.tokenizer_info())

    @app.get("/version", response_model=VersionResponse, responses={**COMMON_ERRORS}, tags=["Server"],
             summary="The server's version")
    async def server_version() -> Response:
        return json_response({"version": str(version)})

    @app.get("/health", response_model=Health, summary="Liveness (no API key needed)", tags=["Server"],
             responses={503: {"model": errors.ErrorResponse, "description": "The engine is not running"}})
    async def health() -> Response:
        if not serving.async_engine.alive:
            raise APIError(f"the engine is not running ({serving.async_engine.last_error or 'stopped'})", 503,
                           code="engine_unavailable")
        return json_response({"status": "ok"})

    @app.get("/metrics", summary="Prometheus metrics", tags=["Server"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}, **COMMON_ERRORS})
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = base_openapi()
        _tidy_openapi(schema, config.api_key is not None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    outer: ASGIApp = BodyLimit(app, config.max_body_bytes)
    if config.api_key:
        outer = APIKeyCheck(outer, config.api_key)
    outer = HTTPMetrics(outer, serving)
    outer.state = app.state  # type: ignore[attr-defined]
    outer.fastapi = app  # type: ignore[attr-defined]
    return outer


def _tidy_openapi(schema: dict[str, Any], bearer: bool) -> None:
    """Validation errors are answered 400 in OpenAI's shape, not FastAPI's 422: describe what really happens."""
    for path in schema.get("paths", {}).values():
        for op in path.values():
            if isinstance(op, dict):
                op.get("responses", {}).pop("422", None)
                if bearer and op.get("operationId", "").startswith("health"):
                    op["security"] = []
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        comps.pop(name, None)
    # the stream chunks (referenced from the text/event-stream responses)
    _, defs = models_json_schema([(m, "serialization") for m in (ChatCompletionChunk, CompletionChunk, StreamError)],
                                 ref_template="#/components/schemas/{model}")
    for name, sub in defs.get("$defs", {}).items():
        comps.setdefault(name, sub)
    if bearer:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http", "scheme": "bearer"}
        schema["security"] = [{"bearerAuth": []}]


__all__ = ["build_app", "ServerConfig"]
