"""The one chat front end: how a chat request becomes a prompt, and how each choice's output text becomes
reasoning, content and tool calls. `LLM.chat`, `LLM.chat_stream` and every server route (chat completions,
Anthropic Messages, Responses) go through it, so they render, detect thinking and parse the same way.

    plan = plan_chat(ChatRequest(messages, tools=tools, tool_choice="required"), tokenizer)
    prompt = plan.engine_prompt()                      # for LLMEngine.add_request / prepare_prompt
    params = params.clone(stop_token_ids=[*params.stop_token_ids, *plan.extra_stop_ids])
    ...
    reader = ChoiceReader(plan)                        # one per choice, streamed
    deltas = reader.feed(new_text)                     # [{"reasoning_content": ...}, {"content": ...}, ...]
    deltas, finish, stop = reader.finish(finish_reason, stop_reason)

Tool choice:
  * "auto" (the default with tools): tools are listed in the prompt; calls the model writes are parsed.
  * "none" (the default without tools): tools are not listed, and `<tool_call>` blocks stay text (content).
  * "required": the think block is closed (no reasoning) and the answer is constrained to tool calls
    (`ChatPlan.forced_call`: the engine's tool-call grammar, `qwen35.engine.structured.structured_for_plan`),
    whose arguments match each tool's schema; one call, or several with `parallel_tool_calls`.
  * {"type": "function", "function": {"name": ...}}: the same, one call of that function.
  The answer is parsed as usual; a call cut by max_tokens is not a tool call and comes back as content. A
  choice with tool calls finishes "tool_calls". With "auto" and `parallel_tool_calls=False`, generation stops
  after the first call (`extra_stop_ids`).
System messages after the first one are folded into the first (the Qwen3.5 template refuses them anywhere but
at the start; clients such as Claude Code send them mid-conversation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .parser import ParsedOutput, StreamParser, parse, prompt_opens_thinking
from .tags import CALL_CLOSE, THINK_CLOSE
from .template import render

#: tools for the parser when calls must not be recognised: no function name can match this one
NO_TOOLS = [{"type": "function", "function": {"name": "<no tools>"}}]
#: template variables that would collide with render()'s own arguments
RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "add_generation_prompt", "template", "chat_template", "tokenize",
                            "documents"}
_SCHEMA_DEPTH = 8


class ChatRequestError(ValueError):
    """A chat request that cannot be planned; `param` names the request field, `code` the kind of problem."""

    def __init__(self, message: str, param: str = "messages", code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class ChatRequest:
    """What every chat caller brings, in the chat template's terms.

    `messages`: template messages ({"role", "content": str | parts, "reasoning_content", "tool_calls",
    "tool_call_id"}; image / video parts as {"type": "image", "image": SRC} / {"type": "video", "video": SRC}).
    `tools`: OpenAI function tools. `tool_choice`: "auto" | "none" | "required" | {"type": "function",
    "function": {"name": N}} (None: "auto" with tools, "none" without). `enable_thinking`: None keeps the
    template's default (on). `structured`: a grammar for the answer (after the reasoning), or None.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    enable_thinking: bool | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    structured: Any = None
    add_generation_prompt: bool = True


@dataclass
class ChatPlan:
    """A planned chat request: the prompt and what reading its answer back needs."""

    prompt: str
    thinking: bool  # the prompt leaves a think block open: the answer starts with reasoning
    parser_tools: list[dict[str, Any]]  # the tools the parser recognises calls of (NO_TOOLS: none)
    # tool_choice required / named: {"tools", "tool_choice", "parallel_tool_calls"} for the tool-call grammar
    forced_call: dict[str, Any] | None = None
    stop_after_call: bool = False
    call_close_id: int | None = None  # the `</tool_call>` token id, stopped on when stop_after_call
    images: list[Any] = field(default_factory=list)  # sources, in the order of the template's placeholders
    videos: list[Any] = field(default_factory=list)
    structured: Any = None

    @property
    def extra_stop_ids(self) -> tuple[int, ...]:
        """Stop token ids the plan adds to the request's own."""
        return (self.call_close_id,) if self.stop_after_call and self.call_close_id is not None else ()

    def engine_prompt(self, images: list[Any] | None = None, videos: list[Any] | None = None) -> dict[str, Any]:
        """The prompt for the engine; `images` / `videos` replace the plan's sources (e.g. once decoded)."""
        images = self.images if images is None else images
        videos = self.videos if videos is None else videos
        if images or videos:
            return {"prompt": self.prompt, "multi_modal_data": {"image": list(images), "video": list(videos)}}
        return {"prompt": self.prompt}


# ------------------------------------------------------------------------------------------ planning
def tool_choice_name(choice: Any) -> str | None:
    """The function a named tool choice names (OpenAI's {"type": "function", "function": {"name"}}), else None."""
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
        if not isinstance(name, str) or not name:
            raise ChatRequestError("a named tool_choice needs a function name", "tool_choice")
        return name
    if choice not in (None, "auto", "none", "required"):
        raise ChatRequestError(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {choice!r}",
                               "tool_choice")
    return None


def fold_system_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """System messages after the first message, folded into one system message at the start (in order)."""
    later = [i for i, m in enumerate(messages) if i > 0 and m.get("role") == "system"]
    if not later:
        return [dict(m) for m in messages]
    texts = [_text(messages[0].get("content"))] if messages and messages[0].get("role") == "system" else []
    texts += [_text(messages[i].get("content")) for i in later]
    rest = [dict(m) for i, m in enumerate(messages) if m.get("role") != "system" or (i > 0 and i not in later)]
    return [{"role": "system", "content": "\n\n".join(t for t in texts if t)}, *rest]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def sanitize_schema(schema: Any, depth: int = 0) -> dict[str, Any]:
    """What the tool-call parser reads of a JSON schema (types, anyOf/oneOf, enum, const), in shapes it can
    always read: a request's arbitrary `parameters` must not be able to break parsing."""
    if not isinstance(schema, Mapping) or depth > _SCHEMA_DEPTH:
        return {}
    out: dict[str, Any] = {}
    t = schema.get("type")
    if isinstance(t, str):
        out["type"] = t
    elif isinstance(t, list):
        out["type"] = [x for x in t if isinstance(x, str)]
    for key in ("anyOf", "oneOf"):
        sub = schema.get(key)
        if isinstance(sub, list):
            out[key] = [sanitize_schema(s, depth + 1) for s in sub]
    if isinstance(schema.get("enum"), list):
        out["enum"] = list(schema["enum"])
    if "const" in schema:
        out["const"] = schema["const"]
    if "properties" in schema:
        props = schema["properties"]
        out["properties"] = {str(k): sanitize_schema(v, depth + 1) for k, v in props.items()} \
            if isinstance(props, Mapping) else {}
    if "items" in schema:
        out["items"] = {}
    return out


def collect_media(messages: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Any]]:
    """The images and videos of a conversation, in the order the chat template writes their placeholders.
    Content items: {"type": "image", "image": PIL / path / URL / bytes}, {"type": "image_url", "image_url":
    {"url": ...}} (or a plain string), {"type": "video", "video": path / URL / list of frames},
    {"type": "video_url", "video_url": {"url": ...}}."""
    images, videos = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for item in content:
            if not isinstance(item, Mapping):
                continue
            kind = item.get("type")
            if kind == "image" or "image" in item:
                images.append(item.get("image"))
            elif kind == "image_url" or "image_url" in item:
                url = item.get("image_url")
                images.append(url.get("url") if isinstance(url, Mapping) else url)
            elif kind == "video" or "video" in item:
                videos.append(item.get("video"))
            elif kind == "video_url" or "video_url" in item:
                url = item.get("video_url")
                videos.append(url.get("url") if isinstance(url, Mapping) else url)
    return images, videos


def plan_chat(req: ChatRequest, tokenizer: Any = None, *, template: str | None = None) -> ChatPlan:
    """Validate and render a chat request. `template`: the chat template (None: the tokenizer's, else the
    built-in one). Raises ChatRequestError (a ValueError) naming the field at fault."""
    tools = [dict(t) for t in req.tools] if req.tools else None
    named = tool_choice_name(req.tool_choice)
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    forcing = choice == "required" or named is not None
    if forcing:
        if not tools:
            raise ChatRequestError(f"tool_choice {'required' if named is None else 'with a function'} needs tools",
                                   "tool_choice")
        names = {(t.get("function") or {}).get("name") for t in tools}
        if named is not None and named not in names:
            raise ChatRequestError(f"tool_choice names function {named!r}, which is not in tools", "tool_choice")

    kwargs = {k: v for k, v in req.template_kwargs.items() if isinstance(k, str) and k not in RESERVED_TEMPLATE_KWARGS}
    if req.enable_thinking is not None:
        kwargs["enable_thinking"] = req.enable_thinking
    messages = fold_system_messages(req.messages)
    if template is None and tokenizer is not None:
        template = getattr(tokenizer, "chat_template", None)
    try:
        prompt = render(messages, tools=tools if choice != "none" else None,
                        add_generation_prompt=req.add_generation_prompt, template=template, **kwargs)
    except ValueError as e:  # ChatTemplateError: the template's own message
        raise ChatRequestError(f"invalid conversation: {e}", "messages", "invalid_chat") from None
    except (TypeError, LookupError, AttributeError, RecursionError) as e:
        raise ChatRequestError(f"the chat template failed on this conversation: {type(e).__name__}: {e}",
                               "messages", "invalid_chat") from None

    forced_call = None
    if forcing:
        if prompt_opens_thinking(prompt):  # no reasoning before a forced call: close the think block
            prompt += ("\n" if not prompt.endswith("\n") else "") + "\n" + THINK_CLOSE + "\n\n"
        forced_call = {"tools": tools, "tool_choice": "required" if named is None else named,
                       "parallel_tool_calls": req.parallel_tool_calls and named is None}
    if choice == "none" or not tools:
        parser_tools = NO_TOOLS
    else:
        parser_tools = [{"type": "function", "function": {
            "name": (t.get("function") or {}).get("name"),
            "parameters": sanitize_schema((t.get("function") or {}).get("parameters") or {})}} for t in tools]
    images, videos = collect_media(messages)
    call_close_id = tokenizer.token_to_id(CALL_CLOSE) if tokenizer is not None else None
    return ChatPlan(prompt=prompt, thinking=prompt_opens_thinking(prompt), parser_tools=parser_tools,
                    forced_call=forced_call,
                    stop_after_call=choice != "none" and bool(tools) and not forcing and not req.parallel_tool_calls,
                    call_close_id=call_close_id, images=images, videos=videos, structured=req.structured)


# ------------------------------------------------------------------------------------------ reading answers
def finish_reason_of(engine_reason: str | None, has_calls: bool) -> str | None:
    """The chat finish reason: "tool_calls" for a choice that stopped with tool calls."""
    return "tool_calls" if engine_reason == "stop" and has_calls else engine_reason


def _closed_call(plan: ChatPlan, stop_reason: Any, include_stop_str: bool) -> bool:
    """The engine stopped on the `</tool_call>` the plan added as a stop (and did not write it out)."""
    return bool(plan.extra_stop_ids) and stop_reason == plan.call_close_id and not include_stop_str


def read_choice(plan: ChatPlan, text: str, finish_reason: str | None, stop_reason: Any = None,
                include_stop_str: bool = False) -> tuple[ParsedOutput, str | None, Any]:
    """A whole choice: (parsed output, chat finish reason, stop reason to report)."""
    closed = _closed_call(plan, stop_reason, include_stop_str)
    parsed = parse(text + (CALL_CLOSE if closed else ""), tools=plan.parser_tools,
                   thinking=plan.thinking)
    return parsed, finish_reason_of(finish_reason, bool(parsed.tool_calls)), \
        (None if plan.extra_stop_ids and stop_reason == plan.call_close_id else stop_reason)


class ChoiceReader:
    """One streamed choice: text in, parser deltas out (dicts with one of `reasoning_content`, `content`,
    `tool_calls`; calls whole). Accumulated, they equal `read_choice` of the whole text."""

    def __init__(self, plan: ChatPlan, include_stop_str: bool = False):
        self.plan, self.include_stop_str = plan, include_stop_str
        self._parser = StreamParser(tools=plan.parser_tools, thinking=plan.thinking)

    @property
    def in_reasoning(self) -> bool:
        return self._parser.in_reasoning

    @property
    def num_tool_calls(self) -> int:
        return self._parser.num_tool_calls

    def feed(self, text: str) -> list[dict[str, Any]]:
        return merge_deltas(self._parser.feed(text)) if text else []

    def finish(self, finish_reason: str | None, stop_reason: Any = None) -> tuple[list[dict[str, Any]], str | None,
                                                                                   Any]:
        """The last deltas, the chat finish reason and the stop reason to report."""
        deltas = self._parser.feed(CALL_CLOSE) if _closed_call(self.plan, stop_reason, self.include_stop_str) else []
        deltas += self._parser.finish()
        stop = None if self.plan.extra_stop_ids and stop_reason == self.plan.call_close_id else stop_reason
        return merge_deltas(deltas), finish_reason_of(finish_reason, self.num_tool_calls > 0), stop


def merge_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive parser deltas of the same kind (reasoning, content, tool calls)."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        key = next(iter(d))
        if out and key in out[-1]:
            out[-1][key] = out[-1][key] + d[key]
        else:
            out.append({key: d[key] if key != "tool_calls" else list(d[key])})
    return out


__all__ = ["ChatPlan", "ChatRequest", "ChatRequestError", "ChoiceReader", "NO_TOOLS", "collect_media",
           "finish_reason_of", "fold_system_messages", "merge_deltas", "plan_chat", "read_choice",
           "sanitize_schema", "tool_choice_name"]
