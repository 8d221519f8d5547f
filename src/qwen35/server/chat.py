"""`POST /v1/chat/completions`: OpenAI's chat completions onto the chat session (`server/chat_session.py`),
which plans with the one chat front end (`qwen35.chat.frontend`: rendering, tool choice, thinking, parsing).

This module only translates: OpenAI messages -> template messages, request fields -> sampling overrides,
`ChoiceResult`s / `ChoiceEvent`s -> the response or its chunks. The reasoning comes back as both `reasoning`
(vLLM's current name) and `reasoning_content` (SGLang's and llama.cpp's); history may carry either.
Thinking: `chat_template_kwargs.enable_thinking`, `reasoning_effort` ("none": off), `thinking_budget`.
Structured output: `response_format` json_object / json_schema, or vLLM's `structured_outputs` (json, regex,
choice, grammar): the grammar starts after the reasoning; tool_choice "required" / named constrain the answer
to tool calls matching the tools' schemas.
Images: `image_url` parts (data: URLs; http(s) and file URLs only where the server allows them, see
`qwen35.server.media`); a model without a vision encoder answers 400 (`images_not_supported`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from qwen35.chat.frontend import ChatRequest
from qwen35.engine.structured import structured_from_request
from qwen35.server.chat_session import ChatSession, start_chat
from qwen35.server.errors import APIError
from qwen35.server.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ImagePart,
    NamedToolChoice,
    SystemMessage,
    ToolMessage,
    UserMessage,
    VideoPart,
)
from qwen35.server.serving import (
    SSE_DONE,
    SSE_HEADERS,
    ClientGone,
    Serving,
    engine_error_event,
    json_response,
    sse,
    usage,
)


# ------------------------------------------------------------------------------------------ messages
def _text_of(content: Any) -> Any:
    if isinstance(content, list):
        return [{"type": "text", "text": p.text} for p in content]
    return content


def convert_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Request messages -> template messages (image and video parts keep their source URL; the session checks
    them against the media policy)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": _text_of(m.content)})
        elif isinstance(m, UserMessage):
            if isinstance(m.content, str):
                out.append({"role": "user", "content": m.content})
                continue
            parts: list[dict[str, Any]] = []
            for p in m.content:
                if isinstance(p, ImagePart):
                    parts.append({"type": "image", "image": p.image_url.url})
                elif isinstance(p, VideoPart):
                    parts.append({"type": "video", "video": p.video_url.url})
                else:
                    parts.append({"type": "text", "text": p.text})
            out.append({"role": "user", "content": parts})
        elif isinstance(m, AssistantMessage):
            msg: dict[str, Any] = {"role": "assistant", "content": _text_of(m.content)}
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                     for c in m.tool_calls]
            out.append(msg)
        elif isinstance(m, ToolMessage):
            msg = {"role": "tool", "content": _text_of(m.content)}
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
    return out


def chat_request(serving: Serving, req: ChatCompletionRequest) -> ChatRequest:
    """The front end's request for an OpenAI chat completions body."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice: Any = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        choice = choice.model_dump()
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", None)
    if thinking is not None and not isinstance(thinking, bool):  # not ours to judge: the template reads it
        kwargs["enable_thinking"], thinking = thinking, None
    if req.reasoning_effort == "none":
        thinking = False
    elif req.reasoning_effort is not None and thinking is None:
        thinking = True
    try:
        structured = structured_from_request(req.structured_outputs, req.response_format)
    except (ValueError, TypeError) as e:
        param = "structured_outputs" if req.structured_outputs is not None else "response_format"
        raise APIError(f"invalid {param}: {e}", 400, param=param, code="invalid_value") from None
    return ChatRequest(convert_messages(req.messages), tools=tools, tool_choice=choice,
                       parallel_tool_calls=req.parallel_tool_calls,
                       enable_thinking=thinking, template_kwargs=kwargs,
                       structured=structured)


def _sampling(req: ChatCompletionRequest) -> dict[str, Any]:
    fields = req.model_dump(include=set(type(req).model_fields) & _SAMPLING_KEYS)
    fields["max_tokens"] = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    fields["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    fields["thinking_budget"] = req.thinking_budget if req.thinking_budget is not None else req.max_thinking_tokens
    return fields


_SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
                  "skip_special_tokens", "include_stop_str_in_output", "logit_bias"}


# ------------------------------------------------------------------------------------------ the route
class ChatHandler:
    def __init__(self, serving: Serving):
        self.s = serving

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response:
        s = self.s
        model = s.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError("stream_options is only allowed with stream: true", 400, param="stream_options",
                           code="invalid_value")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", 400, param="top_logprobs", code="invalid_value")
        if (req.thinking_budget is not None and req.max_thinking_tokens is not None
                and req.thinking_budget != req.max_thinking_tokens):
            raise APIError("thinking_budget and max_thinking_tokens are the same setting; give one", 400,
                           param="thinking_budget", code="invalid_value")
        session = await start_chat(s, chat_request(s, req), _sampling(req), stream=req.stream, endpoint="chat",
                                   max_tokens_param="max_completion_tokens" if req.max_completion_tokens
                                   is not None else "messages",
                                   structured_param="structured_outputs" if req.structured_outputs is not None
                                   else "response_format")
        if req.stream:
            return StreamingResponse(self._stream(req, model, session), media_type="text/event-stream",
                                     headers=SSE_HEADERS, background=BackgroundTask(session.close))
        try:
            results = await session.result(request)
        except ClientGone:
            return Response(status_code=499)
        choices = [{"index": r.index,
                    "message": {"role": "assistant", "content": r.content, "reasoning": r.reasoning_content,
                                "reasoning_content": r.reasoning_content, "tool_calls": r.tool_calls or []},
                    "logprobs": {"content": r.logprobs} if r.logprobs is not None else None,
                    "finish_reason": r.finish_reason, "stop_reason": r.stop_reason} for r in results]
        return json_response({"id": session.request_id, "object": "chat.completion", "created": session.created,
                              "model": model, "choices": choices,
                              "usage": usage(session.prompt_tokens, session.completion_tokens,
                                             session.cached_tokens)})

    async def _stream(self, req: ChatCompletionRequest, model: str, session: ChatSession) -> AsyncIterator[str]:
        opts = req.stream_options
        continuous = opts is not None and bool(opts.continuous_usage_stats)

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, stop_reason: Any = None,
                  logprobs: list[dict[str, Any]] | None = None) -> str:
            choice: dict[str, Any] = {"index": index, "delta": delta,
                                      "logprobs": {"content": logprobs} if logprobs is not None else None,
                                      "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop_reason
            body: dict[str, Any] = {"id": session.request_id, "object": "chat.completion.chunk",
                                    "created": session.created, "model": model, "choices": [choice]}
            if continuous:
                body["usage"] = usage(session.prompt_tokens, session.completion_tokens, session.cached_tokens)
            return sse(body)

        try:
            for i in range(session.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for ev in session.events():
                lp = ev.logprobs
                for d in ev.deltas:
                    if "reasoning_content" in d:
                        d = {"reasoning": d["reasoning_content"], "reasoning_content": d["reasoning_content"]}
                    yield chunk(ev.index, d, logprobs=lp)
                    lp = None
                if lp and ev.finish_reason is None:
                    yield chunk(ev.index, {}, logprobs=lp)
                    lp = None
                if ev.finish_reason is not None:
                    yield chunk(ev.index, {}, ev.finish_reason, ev.stop_reason, lp)
            if opts is not None and opts.include_usage:
                yield sse({"id": session.request_id, "object": "chat.completion.chunk", "created": session.created,
                           "model": model, "choices": [],
                           "usage": usage(session.prompt_tokens, session.completion_tokens, session.cached_tokens)})
            yield SSE_DONE
        except APIError as e:
            yield engine_error_event(e)
            yield SSE_DONE
        finally:
            session.close()


__all__ = ["ChatHandler", "chat_request", "convert_messages"]
