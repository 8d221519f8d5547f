"""One chat request's life in the server, shared by every chat-shaped route (chat completions, Anthropic
Messages, Responses): plan it with the chat front end, submit it, and hand back per-choice results or
per-step events in the front end's terms; each route only translates its protocol to and from these.

    session = await start_chat(serving, ChatRequest(messages, tools=tools), {"max_tokens": 64, "temperature": 0.7},
                               stream=True, endpoint="messages")
    async for ev in session.events(): ...            # ChoiceEvent: index, deltas, finish_reason, stop_reason
    results = await session.result(request)          # or, not streamed: ChoiceResult per choice

The session owns its engine requests: an error, a client that leaves or a consumer that stops early aborts
what is still running (`close()` is idempotent and is also the streaming response's background task).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from qwen35.chat.frontend import (
    ChatPlan,
    ChatRequest,
    ChatRequestError,
    ChoiceReader,
    merge_deltas,
    plan_chat,
    read_choice,
)
from qwen35.engine.structured import structured_for_plan
from qwen35.server.async_engine import EngineError
from qwen35.server.errors import APIError
from qwen35.server.protocol import SamplingFields
from qwen35.server.serving import RequestTimer, Serving, api_error_of, new_id

MAX_VIDEOS = 4
MAX_IMAGES = 32


@dataclass
class ChoiceEvent:
    """One step's news for one choice."""

    index: int
    deltas: list[dict[str, Any]]  # each one of {"reasoning_content"}, {"content"}, {"tool_calls": [whole calls]}
    finish_reason: str | None = None  # None while running; then "stop" | "length" | "tool_calls" | "abort"
    stop_reason: str | int | None = None  # the stop string / token id that ended it
    logprobs: list[dict[str, Any]] | None = None  # chat-shaped entries of this step's tokens (when asked)
    num_tokens: int = 0  # tokens this step added


@dataclass
class ChoiceResult:
    """One whole choice."""

    index: int
    reasoning_content: str | None
    content: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str
    stop_reason: str | int | None
    num_tokens: int
    logprobs: list[dict[str, Any]] | None = None
    num_reasoning_tokens: int | None = None  # not counted today: the engine does not mark reasoning tokens


@dataclass
class ServerPlan:
    """A planned chat request with its prompt ready for the engine."""

    plan: ChatPlan
    prompt_ids: list[int]
    engine_prompt: Any  # the engine's PreparedPrompt (images processed) or {"prompt_token_ids", "prompt"}


def prepare_chat(serving: Serving, chat: ChatRequest) -> ServerPlan:
    """Plan, load media and tokenize (blocking: template, tokenizer, image decoding; run it in a thread)."""
    try:
        plan = plan_chat(chat, serving.tokenizer, template=serving.chat_template)
    except ChatRequestError as e:
        raise APIError(str(e), 400, param=e.param, code=e.code) from None
    media = serving.config.media
    for src in (*plan.images, *plan.videos):  # the media policy first: a refused URL is refused on any model
        if not isinstance(src, str):
            raise APIError("an image or video must be given as a URL or data: URL", 400, param="messages",
                           code="invalid_image")
        media.check(src, "messages")
    if (plan.images or plan.videos) and not serving.accepts_images:
        what = "images" if plan.images else "videos"
        raise APIError(f"this model does not take {what} ({serving.no_vision_message})", 400, param="messages",
                       code="images_not_supported")
    if len(plan.videos) > MAX_VIDEOS:
        raise APIError(f"at most {MAX_VIDEOS} videos per request, got {len(plan.videos)}", 400, param="messages",
                       code="invalid_value")
    if len(plan.images) > MAX_IMAGES:
        raise APIError(f"at most {MAX_IMAGES} images per request, got {len(plan.images)}", 400, param="messages",
                       code="invalid_value")
    if plan.images or plan.videos:
        pictures = [media.load(media.check(src, "messages"), "messages") for src in plan.images]
        videos = [media.check(src, "messages") for src in plan.videos]
        try:
            # videos are decoded by the processor from the checked source (path, data: URL, allowed URL)
            prepared = serving.engine.prepare_prompt({**plan.engine_prompt(pictures, videos),
                                                      "allow_remote_media": media.allow_remote})
        except ValueError as e:  # MediaError, processor refusals
            raise APIError(f"cannot use the images or videos: {e}", 400, param="messages",
                           code="invalid_image") from None
        ids: list[int] = list(prepared.ids)
        engine_prompt: Any = prepared
    else:
        ids = serving.tokenizer.encode(plan.prompt)
        engine_prompt = {"prompt_token_ids": ids, "prompt": plan.prompt}
    serving.check_prompt_ids(ids, "messages")
    return ServerPlan(plan, ids, engine_prompt)


def sampling_fields(sampling: Mapping[str, Any]) -> SamplingFields:
    """A route's sampling overrides (SamplingParams names) as the OpenAI request fields `Serving.sampling_params`
    reads; 400 naming the field for a value out of range."""
    given = {k: v for k, v in sampling.items() if v is not None and k in SamplingFields.model_fields}
    try:
        return SamplingFields.model_validate(given)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ()))
        raise APIError(f"{param}: {err.get('msg')}", 400, param=param or None, code="invalid_value") from None


async def start_chat(serving: Serving, chat: ChatRequest, sampling: Mapping[str, Any], *, stream: bool,
                     endpoint: str, max_tokens_param: str = "max_tokens", clamp_max_tokens: bool = False,
                     structured_param: str = "response_format") -> ChatSession:
    """Plan and submit a chat request. `sampling`: overrides of the checkpoint's defaults by SamplingParams name
    (max_tokens None: what the context leaves; `logprobs`: top-N per token, None for none; `thinking_budget`).
    `clamp_max_tokens`: a max_tokens beyond what the context leaves is cut to it instead of refused (Anthropic
    clients send 32000 whatever the model). `structured_param`: the field named when `chat.structured` does not
    compile. Raises APIError for bad input (400), an unknown model is the route's check."""
    arrival = time.monotonic()
    ready = await asyncio.to_thread(prepare_chat, serving, chat)
    plan = ready.plan
    fields = sampling_fields(sampling)
    want = sampling.get("max_tokens")
    clamped = clamp_max_tokens and want is not None and len(ready.prompt_ids) + want > serving.max_model_len
    if clamped:
        want = None  # what the context leaves (a prompt that does not fit at all is still refused)
    max_tokens = serving.output_budget(len(ready.prompt_ids), want, max_tokens_param)
    top_n = sampling.get("logprobs")
    budget = sampling.get("thinking_budget")
    params = serving.sampling_params(fields, max_tokens=max_tokens, logprobs=top_n,
                                     output_kind="delta" if stream else "final_only",
                                     extra_stop_ids=tuple(i for i in plan.extra_stop_ids
                                                          if i not in (fields.stop_token_ids or [])),
                                     thinking_budget=budget if plan.thinking else None)
    structured = structured_for_plan(plan)
    if structured is not None:
        param = "tool_choice" if plan.forced_call else structured_param
        params = serving.with_structured(params, structured, param)
        try:  # compiled here, in a worker thread: a bad schema is a 400 naming the field, before anything queues
            await asyncio.to_thread(serving.engine.compile_grammar, params)
        except ValueError as e:
            raise APIError(f"invalid {param}: {e}", 400, param=param, code="invalid_value") from None
    rid = new_id("chatcmpl")
    serving.metrics.prompt_tokens.inc(len(ready.prompt_ids))
    engine_stream = serving.submit(rid, ready.engine_prompt, params)
    session = ChatSession(serving, plan, rid, engine_stream, RequestTimer(serving.metrics, endpoint, arrival),
                          prompt_tokens=len(ready.prompt_ids), n=params.n, top_n=top_n,
                          include_stop_str=fields.include_stop_str_in_output)
    session.max_tokens_clamped = clamped
    return session


class ChatSession:
    """A submitted chat request (see the module docstring)."""

    def __init__(self, serving: Serving, plan: ChatPlan, request_id: str, stream: Any, timer: RequestTimer, *,
                 prompt_tokens: int, n: int, top_n: int | None, include_stop_str: bool):
        self.serving, self.plan, self.request_id, self.timer = serving, plan, request_id, timer
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.n, self.top_n, self.include_stop_str = n, top_n, include_stop_str
        self.max_tokens_clamped = False  # start_chat(clamp_max_tokens=True) cut max_tokens to the context
        self._stream = stream
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._stream.finished

    def close(self) -> None:
        """Abort unless finished (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self._stream.finished:
            self.serving.abort([self.request_id])
        if not self.timer.done:  # nobody saw the end: the client went away
            self.timer.finish(["abort"])

    def _logprobs(self, c: Any) -> list[dict[str, Any]] | None:
        if self.top_n is None:
            return None
        return self.serving.chat_logprobs(c, self.top_n) if c.logprobs else []

    async def result(self, request: Request) -> list[ChoiceResult]:
        """Every choice, whole. ClientGone (already aborted) when the client leaves first; APIError on an
        engine error."""
        try:
            outs = await self.serving.final_outputs([self.request_id], [self._stream], request, self.timer)
        finally:
            self._closed = True
        out = outs[0]
        self.cached_tokens = out.num_cached_tokens or 0
        results = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            parsed, finish, stop = read_choice(self.plan, c.text, c.finish_reason, c.stop_reason,
                                               self.include_stop_str)
            results.append(ChoiceResult(c.index, parsed.reasoning_content, parsed.content, parsed.tool_calls,
                                        finish or "stop", stop, len(c.token_ids), self._logprobs(c)))
        self.completion_tokens = sum(r.num_tokens for r in results)
        self.timer.whole([out], self.completion_tokens)
        self.timer.finish([r.finish_reason for r in results])
        return results

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Each step's news per choice; a choice's last event has its finish_reason. Leaving early aborts.
        APIError on an engine error mid-stream (the request is then over)."""
        readers = [ChoiceReader(self.plan, self.include_stop_str) for _ in range(self.n)]
        done = [False] * self.n
        reasons: list[str] = []
        try:
            async for out in self._stream:
                if out.num_cached_tokens is not None:
                    self.cached_tokens = out.num_cached_tokens
                step_tokens = 0
                for c in out.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    step_tokens += len(c.token_ids)
                    self.completion_tokens += len(c.token_ids)
                    deltas = readers[i].feed(c.text)
                    if c.finish_reason is None:
                        if deltas or c.token_ids:
                            yield ChoiceEvent(i, deltas, logprobs=self._logprobs(c), num_tokens=len(c.token_ids))
                        continue
                    last, finish, stop = readers[i].finish(c.finish_reason, c.stop_reason)
                    done[i] = True
                    reasons.append(finish or "stop")
                    yield ChoiceEvent(i, _join(deltas, last), finish or "stop", stop, self._logprobs(c),
                                      len(c.token_ids))
                self.timer.tokens(step_tokens)
            self.timer.finish(reasons)
        except (EngineError, ValueError) as e:
            self.timer.finish(["error"])
            raise api_error_of(e) from None
        finally:
            self.close()


def _join(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return merge_deltas([*a, *b])


__all__ = ["ChatSession", "ChoiceEvent", "ChoiceResult", "ServerPlan", "prepare_chat", "sampling_fields",
           "start_chat"]
