"""`POST /v1/responses` (OpenAI's Responses API, as Codex and the OpenAI Agents SDK speak it), plus
`GET` / `DELETE /v1/responses/{id}` for stored responses.

A thin translation onto the chat session (`server/chat_session.py`, the one chat front end behind it):
input items -> template messages, request fields -> a `ChatRequest` and sampling overrides, and the session's
`ChoiceResult` / `ChoiceEvent`s -> output items (`reasoning`, `message`, `function_call`) or the SDK's stream
events, each with its `sequence_number`.

Input: `instructions` becomes a system message first; `developer` and `system` messages are system messages
(the front end folds later ones into the first); `function_call` items become the assistant's tool calls and
`function_call_output` items tool messages; a `reasoning` item's text (its `content`, else its summary) becomes
the reasoning of the assistant turn that follows it (the template keeps it where the official one does).
Tools: `function` tools only; every other type (web_search, file_search, computer, mcp, namespace, ...) is
ignored with a warning (logged once per type), as Codex and the Agents SDK send them freely.
Reasoning: `reasoning.effort` "none" turns thinking off; "minimal" / "low" / "medium" give a thinking budget
(EFFORT_BUDGETS: at most that many reasoning tokens, then the engine closes the think block); "high", "xhigh",
"max" think without a budget, as does a request without `reasoning` (Qwen3.5's template thinks by default).
`thinking_budget` (vLLM-style extra) wins over the effort's budget.
Structured output: `text.format` json_schema / json_object, in the answer after the reasoning.
Store: responses with `store` (the default) are kept in memory, least recently used first out, at most
STORE_MAX_RESPONSES and about STORE_MAX_BYTES, so `previous_response_id` continues a conversation (an unknown or
evicted id: 404) and GET returns one. `instructions` are not carried over, as OpenAI does.
Truncation: "auto" drops the oldest turns (whole: a user message and what follows it) until the prompt and
`max_output_tokens` fit the context; "disabled" (the default) answers 400 instead. The stored conversation
keeps everything.
Usage: `reasoning_tokens` is the reasoning text re-tokenized (the engine does not mark reasoning tokens).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from pydantic import TypeAdapter
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from qwen35.chat.frontend import ChatRequest
from qwen35.server.chat_session import ChatSession, ChoiceResult, prepare_chat, start_chat
from qwen35.server.errors import BODY_ERRORS, COMMON_ERRORS, APIError
from qwen35.server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputFile,
    InputImage,
    InputItem,
    InputText,
    MessageItem,
    OtherTool,
    OutputText,
    ReasoningItem,
    Refusal,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
    TextFormatJSONObject,
    TextFormatJSONSchema,
)
from qwen35.server.serving import SSE_HEADERS, ClientGone, Serving, dumps, json_response

log = logging.getLogger("qwen35.server")

#: thinking budget (reasoning tokens) per reasoning effort; None: no budget
EFFORT_BUDGETS: dict[str, int | None] = {"minimal": 256, "low": 1024, "medium": 8192, "high": None, "xhigh": None,
                                         "max": None}
STORE_MAX_RESPONSES = 1000
STORE_MAX_BYTES = 256 << 20

_ITEMS = TypeAdapter(list[InputItem])


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# ------------------------------------------------------------------------------------------ the store
@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object, as answered
    items: list[Any]  # the whole conversation so far (input items of the chain, then this response's output)
    nbytes: int  # what it holds, counting the items it shares with earlier responses again (an upper bound)


class ResponseStore:
    """Stored responses, least recently used evicted first beyond `max_responses` or `max_bytes`. A response's
    conversation shares its item objects with the response it continued, so a chain costs little more than its
    last turn; the byte count charges each response its whole conversation, so it bounds memory from above."""

    def __init__(self, max_responses: int = STORE_MAX_RESPONSES, max_bytes: int = STORE_MAX_BYTES):
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def put(self, response_id: str, entry: StoredResponse) -> None:
        self.delete(response_id)
        self._entries[response_id] = entry
        self.nbytes += entry.nbytes
        while self._entries and (len(self._entries) > self.max_responses or self.nbytes > self.max_bytes):
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def delete(self, response_id: str) -> bool:
        old = self._entries.pop(response_id, None)
        if old is None:
            return False
        self.nbytes -= old.nbytes
        return True


def _item_bytes(item: Any) -> int:
    return len(item.model_dump_json(by_alias=True, exclude_none=True))


# ------------------------------------------------------------------------------------------ input items -> messages
def _parts(content: str | Sequence[Any], param: str, *, images: bool) -> str | list[dict[str, Any]]:
    """Message or tool-output content -> template content (text parts, image parts where `images`)."""
    if isinstance(content, str):
        return content
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if isinstance(part, (InputText, OutputText)):
            out.append({"type": "text", "text": part.text})
        elif isinstance(part, Refusal):
            out.append({"type": "text", "text": part.refusal})
        elif isinstance(part, InputImage):
            if not images:
                raise APIError(f"{where}: images are only taken in user messages and function_call_output", 400,
                               param=where, code="invalid_value")
            if not part.image_url:
                raise APIError(f"{where}: input_image needs image_url (a data: URL; file_id is not supported, "
                               f"this server has no Files API)", 400, param=where, code="unsupported_parameter")
            out.append({"type": "image", "image": part.image_url})
        elif isinstance(part, InputFile):
            raise APIError(f"{where}: input_file parts are not supported (give the text as input_text)", 400,
                           param=where, code="unsupported_parameter")
    return out


def _text(content: str | Sequence[Any], param: str) -> str:
    parts = _parts(content, param, images=False)
    return parts if isinstance(parts, str) else "".join(p["text"] for p in parts)


def _reasoning_text(item: ReasoningItem) -> str:
    if item.content:
        return "".join(c.text for c in item.content)
    return "\n\n".join(s.text for s in item.summary)


def items_to_messages(items: Sequence[Any], first_param_index: int = 0) -> list[dict[str, Any]]:
    """Responses input items -> chat template messages. A run of assistant-side items (reasoning, an assistant
    message, function calls) is one assistant turn; a reasoning item, or a message after calls, starts the
    next one. Reasoning no assistant output follows is dropped. `first_param_index`: the index the request's
    own items start at in `items` (what came before is a stored conversation), for error messages."""
    out: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None  # the assistant message the current run of items builds
    reasoning: str | None = None  # reasoning waiting for the assistant output it precedes

    def assistant() -> dict[str, Any]:
        nonlocal turn, reasoning
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            if reasoning is not None:
                turn["reasoning_content"] = reasoning
                reasoning = None
            out.append(turn)
        return turn

    for i, item in enumerate(items):
        param = f"input[{i - first_param_index}]"
        if isinstance(item, MessageItem):
            if item.role == "assistant":
                text = _text(item.content, param + ".content")
                if turn is not None and turn.get("tool_calls"):
                    turn = None
                msg = assistant()
                msg["content"] += text
                continue
            turn, reasoning = None, None
            if item.role == "user":
                out.append({"role": "user", "content": _parts(item.content, param + ".content", images=True)})
            else:  # system, developer
                out.append({"role": "system", "content": _text(item.content, param + ".content")})
        elif isinstance(item, FunctionCallItem):
            msg = assistant()
            msg.setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            turn, reasoning = None, None
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": _parts(item.output, param + ".output", images=True)})
        elif isinstance(item, ReasoningItem):
            turn = None
            text = _reasoning_text(item)
            reasoning = text if reasoning is None else reasoning + "\n\n" + text
    return out


# ------------------------------------------------------------------------------------------ request -> chat
class _ToolTypes:
    """Logs each ignored tool type once (clients send the same hosted tools with every request)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def note(self, types: list[str]) -> None:
        new = sorted(set(types) - self.warned)
        if new:
            self.warned.update(new)
            log.warning("/v1/responses: ignoring tools of type %s (only function tools run on this server)",
                        ", ".join(repr(t) for t in new))


def function_tools(req: ResponsesRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """The request's function tools as chat tools, and the types of the tools it ignores."""
    tools: list[dict[str, Any]] = []
    ignored: list[str] = []
    seen: set[str] = set()
    for i, t in enumerate(req.tools or []):
        if isinstance(t, OtherTool):
            ignored.append(t.type)
            continue
        assert isinstance(t, FunctionTool)
        if t.name in seen:
            raise APIError(f"tools[{i}]: a second function named {t.name!r}", 400, param=f"tools[{i}].name",
                           code="invalid_value")
        seen.add(t.name)
        fn: dict[str, Any] = {"name": t.name, "parameters": t.parameters or {"type": "object", "properties": {}}}
        if t.description is not None:
            fn["description"] = t.description
        if t.strict is not None:
            fn["strict"] = t.strict
        tools.append({"type": "function", "function": fn})
    return tools, ignored


def tool_choice_of(req: ResponsesRequest, tools: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """The chat tool choice and the tools it leaves (allowed_tools narrows them)."""
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice, tools
    if choice.type == "function":
        return {"type": "function", "function": {"name": choice.name}}, tools
    if choice.type == "allowed_tools":
        allowed = {t.name for t in choice.tools if t.type == "function" and t.name}
        kept = [t for t in tools if t["function"]["name"] in allowed]
        if not kept and choice.mode == "required":
            raise APIError("tool_choice allowed_tools with mode 'required' names no function tool of tools", 400,
                           param="tool_choice.tools", code="invalid_value")
        return (choice.mode if kept else "none"), kept
    raise APIError(f"tool_choice of type {choice.type!r} names a built-in tool, which this server does not run; "
                   f"use 'auto', 'none', 'required' or {{\"type\": \"function\", \"name\": ...}}", 400,
                   param="tool_choice", code="unsupported_parameter")


def structured_of(req: ResponsesRequest) -> Any:
    """`text.format` -> the engine's structured-output spec (None for plain text)."""
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, TextFormatJSONSchema):
        spec: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        if fmt.description is not None:
            spec["description"] = fmt.description
        response_format: dict[str, Any] = {"type": "json_schema", "json_schema": spec}
    elif isinstance(fmt, TextFormatJSONObject):
        response_format = {"type": "json_object"}
    else:
        return None
    try:
        from qwen35.engine.structured import structured_from_response_format
    except ImportError:  # structured output not built in this tree
        raise APIError(f"text.format {fmt.type!r} is not supported; only 'text'", 400, param="text.format",
                       code="unsupported_parameter") from None
    try:
        return structured_from_response_format(response_format)
    except (ValueError, TypeError) as e:
        raise APIError(f"invalid text.format: {e}", 400, param="text.format", code="invalid_value") from None


def thinking_of(req: ResponsesRequest) -> tuple[bool | None, int | None]:
    """(enable_thinking, thinking budget) from `reasoning.effort` and `thinking_budget`."""
    effort = req.reasoning.effort if req.reasoning is not None else None
    thinking = None if effort is None else effort != "none"
    budget = req.thinking_budget if req.thinking_budget is not None else EFFORT_BUDGETS.get(effort or "")
    return thinking, budget


def refuse_unsupported(req: ResponsesRequest) -> None:
    if req.background:
        raise APIError("background responses are not supported: leave background false", 400, param="background",
                       code="unsupported_parameter")
    if req.conversation is not None:
        raise APIError("conversation is not supported (no Conversations API): use previous_response_id", 400,
                       param="conversation", code="unsupported_parameter")
    if req.prompt is not None:
        raise APIError("prompt (stored prompt templates) is not supported: send instructions and input", 400,
                       param="prompt", code="unsupported_parameter")
    if req.top_logprobs:
        raise APIError("top_logprobs is not supported on /v1/responses (use /v1/chat/completions)", 400,
                       param="top_logprobs", code="unsupported_parameter")


_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed")


# ------------------------------------------------------------------------------------------ output items
class OutputItems:
    """A response's output items as they grow, with the stream events each change makes (the same ids and
    shapes whether streamed or not): reasoning and text come in pieces into the open item of their kind,
    function calls whole."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the reasoning or message item text is being added to
        self._text = ""
        self.reasoning = ""  # all reasoning text (for the usage count)

    def feed(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        """One front-end delta ({"reasoning_content"}, {"content"} or {"tool_calls"}) -> events."""
        if "reasoning_content" in delta:
            self.reasoning += delta["reasoning_content"]
            return self._add_text("reasoning", delta["reasoning_content"])
        if "content" in delta:
            return self._add_text("message", delta["content"])
        events: list[dict[str, Any]] = []
        for call in delta.get("tool_calls") or ():
            events += self._add_call(call)
        return events

    def finish(self, status: str) -> list[dict[str, Any]]:
        """Close the open item (`status`: "completed", or "incomplete" when the output was cut)."""
        return self._close(status)

    def _add_text(self, kind: str, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != kind:
            events += self._close("completed")
            events += self._start(kind)
        self._text += text
        where = {"item_id": self._open["id"], "output_index": len(self.items) - 1, "content_index": 0}
        if kind == "reasoning":
            events.append({"type": "response.reasoning_text.delta", **where, "delta": text})
        else:
            events.append({"type": "response.output_text.delta", **where, "delta": text, "logprobs": []})
        return events

    def _start(self, kind: str) -> list[dict[str, Any]]:
        if kind == "reasoning":
            item = {"id": new_item_id("rs"), "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": new_item_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.items.append(item)
        self._open, self._text = item, ""
        index = len(self.items) - 1
        return [{"type": "response.output_item.added", "output_index": index, "item": dict(item)},
                {"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                 "content_index": 0, "part": part}]

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, text = self._open, self._text
        if item is None:
            return []
        self._open, self._text = None, ""
        index = len(self.items) - 1
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            part: dict[str, Any] = {"type": "reasoning_text", "text": text}
            done = {"type": "response.reasoning_text.done", **where, "text": text}
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            done = {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
        item["content"] = [part]
        item["status"] = status
        return [done, {"type": "response.content_part.done", **where, "part": dict(part)},
                {"type": "response.output_item.done", "output_index": index, "item": dict(item)}]

    def _add_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close("completed")
        fn = call.get("function") or {}
        args = fn.get("arguments")
        args = args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)
        item = {"id": new_item_id("fc"), "type": "function_call", "call_id": call.get("id") or new_item_id("call"),
                "name": fn.get("name", ""), "arguments": "", "status": "in_progress"}
        self.items.append(item)
        index = len(self.items) - 1
        events.append({"type": "response.output_item.added", "output_index": index, "item": dict(item)})
        events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                       "output_index": index, "delta": args})
        events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                       "output_index": index, "name": item["name"], "arguments": args})
        item["arguments"], item["status"] = args, "completed"
        events.append({"type": "response.output_item.done", "output_index": index, "item": dict(item)})
        return events

    def add_result(self, r: ChoiceResult) -> None:
        """A whole (not streamed) choice."""
        if r.reasoning_content:
            self.feed({"reasoning_content": r.reasoning_content})
        if r.content:
            self.feed({"content": r.content})
        if r.tool_calls:
            self.feed({"tool_calls": r.tool_calls})
        self.finish(item_status(r.finish_reason))


def status_of(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """(response status, incomplete_details) for the choice's finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "abort":
        return "cancelled", None
    return "completed", None


def item_status(finish_reason: str | None) -> str:
    """The last output item's status: "incomplete" when the output was cut."""
    return "completed" if status_of(finish_reason)[0] == "completed" else "incomplete"


# ------------------------------------------------------------------------------------------ the route
@dataclass
class _Turn:
    """One request's fixed parts of the response object, and the conversation to store."""

    req: ResponsesRequest
    model: str
    tools: list[dict[str, Any]]
    prior: list[Any]  # the conversation of the response this one continues
    prior_bytes: int
    new_items: list[Any]  # this request's input items
    id: str = field(default_factory=lambda: new_item_id("resp"))
    created: int = field(default_factory=lambda: int(time.time()))


class ResponsesHandler:
    def __init__(self, serving: Serving, store: ResponseStore | None = None):
        self.s = serving
        self.store = store if store is not None else ResponseStore()
        self._tool_types = _ToolTypes()

    # ------------------------------------------------------------------ create
    async def create(self, req: ResponsesRequest, request: Request) -> Response:
        s = self.s
        model = s.check_model(req.model)
        refuse_unsupported(req)
        prior: list[Any] = []
        prior_bytes = 0
        if req.previous_response_id is not None:
            stored = self.store.get(req.previous_response_id)
            if stored is None:
                raise APIError(f"Previous response with id {req.previous_response_id!r} not found (never stored, "
                               f"stored with store: false, deleted, or evicted)", 404, param="previous_response_id",
                               code="previous_response_not_found")
            prior, prior_bytes = stored.items, stored.nbytes
        new_items = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) \
            else list(req.input or [])
        messages = items_to_messages([*prior, *new_items], len(prior))
        if not messages:
            raise APIError("input is empty: give a string or at least one message item", 400, param="input",
                           code="invalid_value")
        if req.instructions:
            messages.insert(0, {"role": "system", "content": req.instructions})
        tools, ignored = function_tools(req)
        self._tool_types.note(ignored)
        choice, tools = tool_choice_of(req, tools)
        thinking, budget = thinking_of(req)
        # only hosted tools (all ignored) with "auto": a plain answer; "required" without tools is the front end's 400
        chat = ChatRequest(messages, tools=tools or None,
                           tool_choice=None if not tools and choice in (None, "auto", "none") else choice,
                           parallel_tool_calls=req.parallel_tool_calls, enable_thinking=thinking,
                           structured=structured_of(req))
        sampling: dict[str, Any] = {name: getattr(req, name) for name in _SAMPLING}
        sampling.update(max_tokens=req.max_output_tokens, thinking_budget=budget)
        try:
            try:
                session = await start_chat(s, chat, sampling, stream=req.stream, endpoint="responses",
                                           max_tokens_param="input", structured_param="text.format")
            except APIError as e:
                if req.truncation != "auto" or e.code != "context_length_exceeded":
                    raise
                chat = await asyncio.to_thread(self._truncated, chat, req.max_output_tokens, e)
                session = await start_chat(s, chat, sampling, stream=req.stream, endpoint="responses",
                                           max_tokens_param="input", structured_param="text.format")
        except APIError as e:
            raise _renamed(e) from None
        turn = _Turn(req, model, tools, prior, prior_bytes, new_items)
        if req.stream:
            return StreamingResponse(self._stream(turn, session), media_type="text/event-stream",
                                     headers=SSE_HEADERS, background=BackgroundTask(session.close))
        try:
            results = await session.result(request)
        except ClientGone:
            return Response(status_code=499)
        out = OutputItems()
        out.add_result(results[0])
        body = self._response(turn, out.items, status_of(results[0].finish_reason),
                              self._usage(session, out.reasoning))
        self._keep(turn, out, body)
        return json_response(body)

    async def _stream(self, turn: _Turn, session: ChatSession) -> AsyncIterator[str]:
        seq = 0

        def event(body: dict[str, Any]) -> str:
            nonlocal seq
            body = {**body, "sequence_number": seq}
            seq += 1
            return f"event: {body['type']}\ndata: {dumps(body)}\n\n"

        out = OutputItems()
        try:
            start = self._response(turn, [], ("in_progress", None), None)
            yield event({"type": "response.created", "response": start})
            yield event({"type": "response.in_progress", "response": start})
            finish: str | None = None
            async for ev in session.events():
                for d in ev.deltas:
                    for e in out.feed(d):
                        yield event(e)
                if ev.finish_reason is not None:
                    finish = ev.finish_reason
            status = status_of(finish)
            for e in out.finish(item_status(finish)):
                yield event(e)
            body = self._response(turn, out.items, status, self._usage(session, out.reasoning))
            self._keep(turn, out, body)
            yield event({"type": "response.completed" if status[0] == "completed" else "response.incomplete",
                         "response": body})
        except Exception as e:  # noqa: BLE001 (a failed request ends its stream in protocol; the server goes on)
            err = e if isinstance(e, APIError) else APIError(f"generation failed: {type(e).__name__}: {e}", 500,
                                                             code="server_error")
            if not isinstance(e, APIError):
                log.error("/v1/responses stream failed", exc_info=e)
            yield event({"type": "error", "code": err.code or err.type, "message": err.message, "param": err.param})
            failed = self._response(turn, out.items, ("failed", None), self._usage(session, out.reasoning))
            failed["error"] = {"code": "server_error" if err.status >= 500 else "invalid_prompt",
                               "message": err.message}
            yield event({"type": "response.failed", "response": failed})
        finally:
            session.close()

    def _truncated(self, chat: ChatRequest, max_tokens: int | None, overflow: APIError) -> ChatRequest:
        """`truncation: "auto"`: the conversation without its fewest oldest turns (a user message and what
        follows it up to the next one) that let it fit the context; the leading system messages and the last
        turn always stay. Raises `overflow` when even that is too long. Blocking (renders): run in a thread."""
        messages = chat.messages
        head = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
        cuts = [i for i in range(head + 1, len(messages)) if messages[i].get("role") == "user"]

        def without(k: int) -> ChatRequest:
            kept = messages[:head] + messages[cuts[k - 1]:] if k else messages
            return dataclasses.replace(chat, messages=kept)

        def fits(k: int) -> bool:
            ready = prepare_chat(self.s, without(k))
            try:
                self.s.output_budget(len(ready.prompt_ids), max_tokens, "input")
            except APIError as e:
                if e.code == "context_length_exceeded":
                    return False
                raise
            return True

        if not cuts or not fits(len(cuts)):
            raise overflow
        lo, hi = 0, len(cuts)  # fits(hi); not fits(lo): the first start failed on it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return without(hi)

    # ------------------------------------------------------------------ stored responses
    async def retrieve(self, response_id: str) -> Response:
        stored = self.store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return json_response(stored.response)

    async def delete(self, response_id: str) -> Response:
        if not self.store.delete(response_id):
            raise _not_found(response_id)
        return json_response({"id": response_id, "object": "response", "deleted": True})

    # ------------------------------------------------------------------ building
    def _usage(self, session: ChatSession, reasoning: str) -> dict[str, Any]:
        reasoning_tokens = min(len(self.s.tokenizer.encode(reasoning)), session.completion_tokens) if reasoning else 0
        return {"input_tokens": session.prompt_tokens,
                "input_tokens_details": {"cached_tokens": session.cached_tokens or 0,
                                         "cache_write_tokens": 0},  # not tracked
                "output_tokens": session.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": session.prompt_tokens + session.completion_tokens}

    def _response(self, turn: _Turn, output: list[dict[str, Any]], status: tuple[str, dict[str, Any] | None],
                  usage: dict[str, Any] | None) -> dict[str, Any]:
        req, defaults = turn.req, self.s.defaults
        fmt = req.text.format if req.text is not None else None
        choice = req.tool_choice
        body: dict[str, Any] = {
            "id": turn.id, "object": "response", "created_at": turn.created, "status": status[0],
            "background": False, "error": None, "incomplete_details": status[1],
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": turn.model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                          "summary": req.reasoning.summary if req.reasoning else None},
            "store": req.store,
            "temperature": req.temperature if req.temperature is not None else defaults.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None
                     else {"type": "text"}},
            "tool_choice": (choice if isinstance(choice, str) else choice.model_dump(exclude_none=True))
            if choice is not None else "auto",
            "tools": [{"type": "function", "name": t["function"]["name"],
                       "description": t["function"].get("description"),
                       "parameters": t["function"]["parameters"], "strict": t["function"].get("strict")}
                      for t in turn.tools],
            "top_p": req.top_p if req.top_p is not None else defaults.top_p,
            "truncation": req.truncation or "disabled", "usage": usage, "user": req.user,
            "metadata": req.metadata or {},
        }
        if status[0] in ("completed", "incomplete"):
            body["completed_at"] = int(time.time())
        return body

    def _keep(self, turn: _Turn, out: OutputItems, body: dict[str, Any]) -> None:
        if not turn.req.store:
            return
        produced = _ITEMS.validate_python(out.items)
        own = [*turn.new_items, *produced]
        nbytes = turn.prior_bytes + sum(_item_bytes(i) for i in own) + len(dumps(body))
        self.store.put(turn.id, StoredResponse(body, [*turn.prior, *own], nbytes))


def _renamed(e: APIError) -> APIError:
    """The session names chat fields; say what the Responses request calls them."""
    names = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
    if e.param in names:
        e.param = names[e.param]
    return e


def _not_found(response_id: str) -> APIError:
    return APIError(f"Response with id {response_id!r} not found", 404, param="response_id", code="not_found")


def responses_router(serving: Serving, store: ResponseStore | None = None) -> APIRouter:
    """The Responses routes, answered by `serving` (stored responses in `store`, default a new ResponseStore)."""
    handler = ResponsesHandler(serving, store)
    router = APIRouter(tags=["OpenAI"])
    stream_doc = {"schema": {"type": "string", "description": "server-sent events `event: TYPE` / `data: JSON`, "
                                                              "each with its sequence_number: response.created ... "
                                                              "response.completed (or response.incomplete; on an "
                                                              "error: error, then response.failed)"}}
    not_found = {404: {"model": BODY_ERRORS[404]["model"], "description": "No stored response with this id"},
                 **COMMON_ERRORS}

    @router.post("/v1/responses", response_model=None, summary="Create a response (OpenAI Responses API)",
                 responses={200: {"model": ResponseObject, "content": {"text/event-stream": stream_doc},
                                  "description": "The response (JSON), or with stream: true an event stream"},
                            **BODY_ERRORS})
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return await handler.create(body, request)

    @router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=not_found,
                summary="Get a stored response")
    async def get_response(response_id: str) -> Response:
        return await handler.retrieve(response_id)

    @router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=not_found,
                   summary="Delete a stored response")
    async def delete_response(response_id: str) -> Response:
        return await handler.delete(response_id)

    return router


__all__ = ["EFFORT_BUDGETS", "OutputItems", "ResponseStore", "ResponsesHandler", "items_to_messages",
           "responses_router"]
