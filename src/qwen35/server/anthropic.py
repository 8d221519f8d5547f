"""`POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API (what Claude Code and the
`anthropic` SDK speak) as a thin translation onto the chat session (`server/chat_session.py`), which plans with
the one chat front end (rendering, tool choice, thinking, parsing).

Request -> front end:
  * `system` (a string or text blocks, joined by blank lines) and `system` messages inside `messages` (some
    clients send them mid-conversation) become system messages; the front end folds the later ones into the
    first, in order (the Qwen3.5 template accepts a system message only at the start). Claude Code's
    per-request `x-anthropic-billing-header: ...` line is dropped: it changes on every request and would
    defeat the prefix cache from the first tokens on.
  * user blocks: text; image (base64 -> a data: URL; url -> checked against the server's media policy);
    plain-text documents; `tool_result` -> a `tool` message (an `is_error` result is prefixed "Error: ").
    Assistant blocks: text; `tool_use` -> a tool call; `thinking` -> `reasoning_content`; `redacted_thinking`
    is dropped (there is nothing to read in it).
  * tools with an `input_schema` -> function tools; Anthropic's server tools (web search, bash_* ...), which
    have none, are left out with a warning. tool_choice auto / any (-> required) / tool (-> named) / none;
    `disable_parallel_tool_use` -> one call at most.
  * `thinking`: enabled -> on, `budget_tokens` is the thinking budget; adaptive -> on without a budget;
    disabled -> off; absent -> the template's default, which is on for Qwen3.5: the model is trained to think,
    it is what the same request gets from vLLM, SGLang and llama.cpp, and the Anthropic clients show thinking
    blocks in any answer. `display: "omitted"` sends the blocks with their text left out.
  * `max_tokens` is an upper bound: clients send large ones (Claude Code 32000), so it is cut to what the
    context leaves after the prompt; an answer that then fills the context stops with
    `model_context_window_exceeded`.
  * a final assistant message (Anthropic's "prefill") is refused with a 400: the front end starts a new
    assistant turn and cannot continue one.

Response: `thinking` (with an opaque `signature`), `text` and `tool_use` blocks; stop_reason end_turn,
max_tokens, stop_sequence (with `stop_sequence`), tool_use. `usage.input_tokens` counts the prompt tokens the
prefix cache did not serve, `cache_read_input_tokens` those it did (Anthropic's split: their sum is the prompt).
Streaming follows Anthropic's event order: message_start, ping, then per block content_block_start /
content_block_delta (text_delta, thinking_delta, signature_delta before a thinking block stops,
input_json_delta: one per call, which the parser gives whole) / content_block_stop, then message_delta
(stop_reason, usage) and message_stop; a ping every PING_INTERVAL_S of silence (a long prefill), and an
`error` event when the engine fails mid-stream. Errors on these routes come in Anthropic's shape
(`{"type": "error", "error": {"type", "message"}}`), validation errors of the body included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from qwen35.chat.frontend import ChatRequest
from qwen35.server.anthropic_protocol import (
    AnthropicErrorResponse,
    CountTokensRequest,
    CountTokensResponse,
    DocumentBlock,
    ImageBlock,
    InputMessage,
    MessageResponse,
    MessagesRequest,
    OutputConfig,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingAdaptive,
    ThinkingBlock,
    ThinkingDisabled,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolDef,
    ToolResultBlock,
    ToolUseBlock,
    _Conversation,
)
from qwen35.server.chat_session import ChatSession, prepare_chat, start_chat
from qwen35.server.errors import APIError, validation_message
from qwen35.server.media import MediaPolicy
from qwen35.server.serving import SSE_HEADERS, ClientGone, Serving, dumps

log = logging.getLogger("qwen35.server")

#: the routes that answer in Anthropic's shapes (errors of the middlewares included)
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
PING_INTERVAL_S = 10.0
BILLING_HEADER = "x-anthropic-billing-header:"

# ------------------------------------------------------------------------------------------ errors
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic_path(path: str) -> bool:
    return path.rstrip("/") in ANTHROPIC_PATHS


def anthropic_error_body(err: APIError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def anthropic_error_response(err: APIError) -> Response:
    return Response(dumps(anthropic_error_body(err)), status_code=err.status, media_type="application/json")


# ------------------------------------------------------------------------------------------ request -> front end
def strip_billing_header(text: str) -> str:
    """`text` without Claude Code's billing-header lines."""
    if BILLING_HEADER not in text:
        return text
    return "\n".join(line for line in text.split("\n") if not line.lstrip().startswith(BILLING_HEADER)).strip("\n")


def system_text(system: str | list[TextBlock]) -> str:
    texts = [system] if isinstance(system, str) else [b.text for b in system]
    return "\n\n".join(t for t in (strip_billing_header(t) for t in texts) if t)


def _image_source(block: ImageBlock, media: MediaPolicy, param: str) -> str:
    src = block.source
    if src.type == "base64":
        return f"data:{src.media_type};base64,{src.data}"
    media.check(src.url, param)  # refuse here, naming the block; the session checks it again as it loads
    return src.url


def _document_text(block: DocumentBlock) -> str:
    return "\n\n".join(t for t in (block.title, block.context, block.source.data) if t)


def _tool_message(block: ToolResultBlock, media: MediaPolicy, param: str) -> dict[str, Any]:
    content: str | list[dict[str, Any]]
    if block.content is None or isinstance(block.content, str):
        content = block.content or ""
        if block.is_error:
            content = "Error: " + content
    elif all(isinstance(b, TextBlock) for b in block.content):
        content = ("Error: " if block.is_error else "") + "".join(b.text for b in block.content)  # type: ignore
    else:
        content = [{"type": "text", "text": "Error: "}] if block.is_error else []
        for k, b in enumerate(block.content):
            if isinstance(b, TextBlock):
                content.append({"type": "text", "text": b.text})
            else:
                content.append({"type": "image", "image": _image_source(b, media, f"{param}.content[{k}].source")})
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def _not_here(block: Any, role: str, param: str) -> APIError:
    return APIError(f"{param}: a {role} message cannot hold a {block.type} block", 400, param=param,
                    code="invalid_value")


def _user_messages(msg: InputMessage, media: MediaPolicy, param: str) -> list[dict[str, Any]]:
    """One user message becomes tool messages (its tool_result blocks) and user messages (the other blocks),
    in their order."""
    if isinstance(msg.content, str):
        return [{"role": "user", "content": msg.content}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, b in enumerate(msg.content):
        where = f"{param}.content[{j}]"
        if isinstance(b, TextBlock):
            parts.append({"type": "text", "text": b.text})
        elif isinstance(b, ImageBlock):
            parts.append({"type": "image", "image": _image_source(b, media, where + ".source")})
        elif isinstance(b, DocumentBlock):
            parts.append({"type": "text", "text": _document_text(b)})
        elif isinstance(b, ToolResultBlock):
            if parts:
                out.append({"role": "user", "content": parts})
                parts = []
            out.append(_tool_message(b, media, where))
        else:
            raise _not_here(b, "user", where)
    if parts or not out:
        out.append({"role": "user", "content": parts})
    return out


def _assistant_message(msg: InputMessage, param: str) -> dict[str, Any]:
    if isinstance(msg.content, str):
        return {"role": "assistant", "content": msg.content}
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(msg.content):
        if isinstance(b, TextBlock):
            texts.append(b.text)
        elif isinstance(b, ThinkingBlock):
            thoughts.append(b.thinking)
        elif isinstance(b, RedactedThinkingBlock):
            continue  # encrypted by Anthropic: nothing a local model can read
        elif isinstance(b, ToolUseBlock):
            calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
        else:
            raise _not_here(b, "assistant", f"{param}.content[{j}]")
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if any(thoughts):
        out["reasoning_content"] = "\n\n".join(t for t in thoughts if t)
    if calls:
        out["tool_calls"] = calls
    return out


def convert_messages(req: _Conversation, media: MediaPolicy) -> list[dict[str, Any]]:
    """The request's system prompt and messages as template messages."""
    out: list[dict[str, Any]] = []
    if req.system is not None and (text := system_text(req.system)):
        out.append({"role": "system", "content": text})
    for i, msg in enumerate(req.messages):
        param = f"messages[{i}]"
        if msg.role == "user":
            out.extend(_user_messages(msg, media, param))
        elif msg.role == "assistant":
            out.append(_assistant_message(msg, param))
        else:
            blocks = [msg.content] if isinstance(msg.content, str) else msg.content
            bad = next((j for j, b in enumerate(blocks) if not isinstance(b, (str, TextBlock))), None)
            if bad is not None:
                raise APIError(f"{param}.content[{bad}]: a system message holds text blocks only", 400,
                               param=f"{param}.content[{bad}]", code="invalid_value")
            if text := system_text(msg.content):  # type: ignore[arg-type]
                out.append({"role": "system", "content": text})
    if req.messages[-1].role == "assistant":
        raise APIError(f"messages[{len(req.messages) - 1}]: the last message must come from the user; continuing "
                       "an assistant message (prefill) is not supported", 400,
                       param=f"messages[{len(req.messages) - 1}]", code="invalid_value")
    return out


def convert_tools(tools: list[ToolDef] | None) -> tuple[list[dict[str, Any]] | None, set[str]]:
    """Function tools for the client tools, and the names of the server tools left out."""
    if not tools:
        return None, set()
    out, skipped = [], set()
    for t in tools:
        if t.input_schema is None or t.type not in (None, "custom"):
            skipped.add(t.name)
            continue
        fn: dict[str, Any] = {"name": t.name, "parameters": t.input_schema}
        if t.description is not None:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    if skipped:
        log.warning("/v1/messages: left out tools this server cannot run (Anthropic server tools, no "
                    "input_schema): %s", ", ".join(sorted(skipped)))
    return out or None, skipped


def convert_tool_choice(req: _Conversation, tools: list[dict[str, Any]] | None,
                        skipped: set[str]) -> tuple[str | dict[str, Any] | None, bool]:
    """The front end's tool_choice and parallel_tool_calls."""
    choice = req.tool_choice
    if choice is None:
        return None, True
    if isinstance(choice, ToolChoiceNone):
        return "none", True
    parallel = not choice.disable_parallel_tool_use
    if isinstance(choice, (ToolChoiceAny, ToolChoiceTool)) and not tools:
        raise APIError(f"tool_choice {choice.type!r} needs tools with an input_schema", 400, param="tool_choice",
                       code="invalid_value")
    if isinstance(choice, ToolChoiceTool):
        if choice.name in skipped:
            raise APIError(f"tool_choice names {choice.name!r}, a server tool this server does not run", 400,
                           param="tool_choice.name", code="invalid_value")
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return ("required" if isinstance(choice, ToolChoiceAny) else "auto"), parallel


def _structured(config: OutputConfig | None) -> Any:
    """The grammar for `output_config.format` (a JSON schema the answer must follow), or None."""
    if config is None or config.format is None:
        return None
    from qwen35.engine.structured import structured_from_response_format  # llguidance: imported when needed

    fmt = {"type": "json_schema", "json_schema": {"name": "output", "schema": config.format.schema_, "strict": True}}
    try:
        return structured_from_response_format(fmt)
    except (ValueError, TypeError) as e:
        message = str(e).replace("response_format.json_schema.schema", "output_config.format.schema")
        raise APIError(f"invalid output_config.format: {message}", 400, param="output_config.format",
                       code="invalid_value") from None


def chat_request(req: _Conversation, media: MediaPolicy) -> ChatRequest:
    """The front end's request for a Messages (or count_tokens) body."""
    tools, skipped = convert_tools(req.tools)
    choice, parallel = convert_tool_choice(req, tools, skipped)
    thinking = req.thinking
    enable = None if thinking is None else not isinstance(thinking, ThinkingDisabled)
    return ChatRequest(convert_messages(req, media), tools=tools, tool_choice=choice, parallel_tool_calls=parallel,
                       enable_thinking=enable, structured=_structured(req.output_config))


def sampling_of(req: MessagesRequest) -> dict[str, Any]:
    """Sampling overrides (SamplingParams names) of a Messages body."""
    fields = {k: getattr(req, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                          "frequency_penalty", "repetition_penalty", "seed")}
    fields["stop"] = req.stop_sequences
    fields["thinking_budget"] = req.thinking.budget_tokens if isinstance(req.thinking, ThinkingEnabled) else None
    return fields


def thinking_omitted(req: MessagesRequest) -> bool:
    return isinstance(req.thinking, (ThinkingEnabled, ThinkingAdaptive)) and req.thinking.display == "omitted"


# ------------------------------------------------------------------------------------------ front end -> response
def message_id(request_id: str) -> str:
    return "msg_" + request_id.split("-", 1)[-1]


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(call: dict[str, Any]) -> dict[str, Any]:
    """A parsed call's arguments as the object Anthropic's `input` is (the parser writes a JSON object)."""
    args = call["function"]["arguments"]
    value = json.loads(args) if isinstance(args, str) else args
    return value if isinstance(value, dict) else {}


class ThinkingSignature:
    """The opaque `signature` of a thinking block: a digest of its text (clients send it back untouched; the
    server reads the text, not the signature)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, text: str) -> None:
        self._hash.update(text.encode())

    def value(self) -> str:
        return "qwen35-" + self._hash.hexdigest()


def signature_of(text: str) -> str:
    sig = ThinkingSignature()
    sig.update(text)
    return sig.value()


def stop_reason_of(finish: str | None, stop: str | int | None, context_cut: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for the chat finish reason. `context_cut`: max_tokens was cut to what the
    context leaves, so running out of tokens means the context is full."""
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return ("model_context_window_exceeded" if context_cut else "max_tokens"), None
    if isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None  # EOS, a stop token, or an abort


def usage_of(session: ChatSession) -> dict[str, int]:
    cached = session.cached_tokens or 0
    return {"input_tokens": session.prompt_tokens - cached, "output_tokens": session.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def sse_event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {dumps(data)}\n\n"


PING = sse_event("ping", {"type": "ping"})


class BlockWriter:
    """Turns the front end's deltas into Anthropic's content-block events: one block per run of reasoning
    (thinking) or content (text), one per tool call; a thinking block gets its signature_delta just before it
    stops. `flush()` hands over the events written since the last call."""

    def __init__(self, omit_thinking: bool = False):
        self.omit_thinking = omit_thinking
        self.index = -1
        self.kind: str | None = None  # the open block's type
        self._signature = ThinkingSignature()
        self._out: list[str] = []

    def flush(self) -> str:
        out, self._out = "".join(self._out), []
        return out

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self._out.append(sse_event(name, {"type": name, **data}))

    def _delta(self, delta: dict[str, Any]) -> None:
        self._emit("content_block_delta", {"index": self.index, "delta": delta})

    def _open(self, kind: str, block: dict[str, Any]) -> None:
        self.close_block()
        self.index += 1
        self.kind = kind
        self._emit("content_block_start", {"index": self.index, "content_block": {"type": kind, **block}})

    def thinking(self, text: str) -> None:
        if self.kind != "thinking":
            self._open("thinking", {"thinking": "", "signature": ""})
            self._signature = ThinkingSignature()
        self._signature.update(text)
        if not self.omit_thinking:
            self._delta({"type": "thinking_delta", "thinking": text})

    def text(self, text: str) -> None:
        if self.kind != "text":
            self._open("text", {"text": ""})
        self._delta({"type": "text_delta", "text": text})

    def tool_use(self, call: dict[str, Any]) -> None:
        self._open("tool_use", {"id": tool_use_id(call["id"]), "name": call["function"]["name"], "input": {}})
        self._delta({"type": "input_json_delta", "partial_json": dumps(tool_input(call))})
        self.close_block()

    def feed(self, deltas: list[dict[str, Any]]) -> None:
        for d in deltas:
            if "reasoning_content" in d:
                self.thinking(d["reasoning_content"])
            elif "content" in d:
                self.text(d["content"])
            else:
                for call in d.get("tool_calls", ()):
                    self.tool_use(call)

    def close_block(self) -> None:
        if self.kind is None:
            return
        if self.kind == "thinking":
            self._delta({"type": "signature_delta", "signature": self._signature.value()})
        self._emit("content_block_stop", {"index": self.index})
        self.kind = None


async def with_pings(events: AsyncIterator[Any], interval: float) -> AsyncIterator[Any]:
    """`events`, with a None whenever `interval` seconds pass without one (time to send a ping). Leaving early
    cancels the reader, which ends `events` (the chat session then aborts its request)."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for ev in events:
                queue.put_nowait(("event", ev))
        except Exception as e:  # noqa: BLE001 (handed to the consumer)
            queue.put_nowait(("error", e))
            return
        queue.put_nowait(("end", None))

    reader = asyncio.ensure_future(pump())
    try:
        while True:
            try:
                kind, item = await asyncio.wait_for(queue.get(), interval)
            except TimeoutError:
                yield None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        reader.cancel()


# ------------------------------------------------------------------------------------------ the routes
class MessagesHandler:
    def __init__(self, serving: Serving):
        self.s = serving

    async def _start(self, chat: ChatRequest, sampling: dict[str, Any], stream: bool) -> tuple[ChatSession, bool]:
        """Submit; a max_tokens that does not fit after the prompt is cut to what the context leaves (clients
        send Anthropic's large bounds). Returns the session and whether max_tokens was cut."""
        session = await start_chat(self.s, chat, sampling, stream=stream, endpoint="messages",
                                   max_tokens_param="messages", clamp_max_tokens=True,
                                   structured_param="output_config.format")
        return session, session.max_tokens_clamped

    async def create(self, req: MessagesRequest, request: Request) -> Response:
        model = self.s.check_model(req.model)
        session, cut = await self._start(chat_request(req, self.s.config.media), sampling_of(req), req.stream)
        headers = {"request-id": message_id(session.request_id)}
        if req.stream:
            return StreamingResponse(self._stream(session, model, thinking_omitted(req), cut),
                                     media_type="text/event-stream", headers={**SSE_HEADERS, **headers},
                                     background=BackgroundTask(session.close))
        try:
            results = await session.result(request)
        except ClientGone:
            return Response(status_code=499)
        r = results[0]
        content: list[dict[str, Any]] = []
        if r.reasoning_content:
            content.append({"type": "thinking", "signature": signature_of(r.reasoning_content),
                            "thinking": "" if thinking_omitted(req) else r.reasoning_content})
        if r.content:
            content.append({"type": "text", "text": r.content})
        for call in r.tool_calls or ():
            content.append({"type": "tool_use", "id": tool_use_id(call["id"]), "name": call["function"]["name"],
                            "input": tool_input(call)})
        reason, sequence = stop_reason_of(r.finish_reason, r.stop_reason, cut)
        body = {"id": message_id(session.request_id), "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": reason, "stop_sequence": sequence, "usage": usage_of(session)}
        return Response(dumps(body), media_type="application/json", headers=headers)

    async def _stream(self, session: ChatSession, model: str, omit_thinking: bool, cut: bool) -> AsyncIterator[str]:
        writer = BlockWriter(omit_thinking)
        finish: str | None = None
        stop: str | int | None = None
        try:
            start_usage = {"input_tokens": session.prompt_tokens, "output_tokens": 0,
                           "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
            yield sse_event("message_start", {"type": "message_start", "message": {
                "id": message_id(session.request_id), "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
            yield PING
            async with contextlib.aclosing(with_pings(session.events(), PING_INTERVAL_S)) as events:
                async for ev in events:
                    if ev is None:
                        yield PING
                        continue
                    writer.feed(ev.deltas)
                    if ev.finish_reason is not None:
                        finish, stop = ev.finish_reason, ev.stop_reason
                    if out := writer.flush():
                        yield out
            writer.close_block()
            reason, sequence = stop_reason_of(finish, stop, cut)
            yield writer.flush() + sse_event("message_delta", {
                "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": usage_of(session)}) + sse_event("message_stop", {"type": "message_stop"})
        except APIError as e:
            yield sse_event("error", anthropic_error_body(e))
        except Exception as e:  # noqa: BLE001 (the stream ends with an error event; the server goes on)
            log.error("unhandled error in a /v1/messages stream", exc_info=e)
            yield sse_event("error", anthropic_error_body(APIError(f"internal error: {type(e).__name__}", 500)))
        finally:
            session.close()

    async def count_tokens(self, req: CountTokensRequest) -> Response:
        self.s.check_model(req.model)
        ready = await asyncio.to_thread(prepare_chat, self.s, chat_request(req, self.s.config.media))
        return Response(dumps({"input_tokens": len(ready.prompt_ids)}), media_type="application/json")


class AnthropicRoute(APIRoute):
    """A route whose every error (a bad body, an APIError, anything unexpected) is answered in Anthropic's
    shape rather than by the app's OpenAI-shaped handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                message, param, code = validation_message(e)
                err = APIError(message, 400, param=param, code=code)
            except APIError as e:
                err = e
            except HTTPException as e:  # FastAPI's own: a body that is not UTF-8 ...
                err = APIError(str(e.detail), e.status_code)
            except Exception as e:  # noqa: BLE001 (one request fails; the server goes on)
                log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
                err = APIError(f"internal error: {type(e).__name__}", 500)
            return anthropic_error_response(err)

        return route


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "Malformed JSON, missing or invalid fields, prompt longer than the context, media not allowed",
            401: "Missing or wrong API key (x-api-key or Authorization: Bearer)", 404: "Unknown model",
            413: "Request body too large", 500: "Internal error (the request failed; the server goes on)"}
    return {s: {"model": AnthropicErrorResponse, "description": what[s]} for s in statuses}


def anthropic_router(serving: Serving) -> APIRouter:
    """The Messages routes, answered by `serving`."""
    handler = MessagesHandler(serving)
    router = APIRouter(route_class=AnthropicRoute, tags=["Anthropic"])
    stream_doc = {"schema": {"type": "string", "description": "server-sent events `event: NAME` / `data: JSON` in "
                                                              "Anthropic's order (message_start ... message_stop)"}}

    @router.post("/v1/messages", response_model=None, summary="Create a message (Anthropic Messages API)",
                 responses={200: {"model": MessageResponse, "content": {"text/event-stream": stream_doc},
                                  "description": "The message (JSON), or with stream: true an event stream"},
                            **_errors(400, 401, 404, 413, 500)})
    async def create_message(body: MessagesRequest, request: Request) -> Response:
        return await handler.create(body, request)

    @router.post("/v1/messages/count_tokens", response_model=CountTokensResponse,
                 summary="Count the prompt tokens of a message request", responses={**_errors(400, 401, 404, 413,
                                                                                               500)})
    async def count_message_tokens(body: CountTokensRequest) -> Response:
        return await handler.count_tokens(body)

    return router


__all__ = ["ANTHROPIC_PATHS", "AnthropicRoute", "BlockWriter", "MessagesHandler", "anthropic_error_body",
           "anthropic_router", "chat_request", "convert_messages", "is_anthropic_path", "sampling_of",
           "stop_reason_of", "with_pings"]
