"""The official Qwen3.5 chat template, written in Python.

Byte-identical to ``chat_template.jinja`` of the official checkpoints (the tests hold it to a jinja rendering
of that file), including its quirks: content is trimmed, ``reasoning_content`` is kept only for assistant
turns after the last real user query, inline ``<think>...</think>`` is split out of assistant content when
there is no ``reasoning_content``, tool-call argument values that are dicts or lists are JSON, other values
are ``str()``-ed (so ``True`` renders as ``True``), consecutive ``tool`` messages share one user turn.

Messages are expected already normalised by :func:`qwen35.chat.template.normalize_messages` (``render``
does it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


class ChatTemplateError(ValueError):
    """An invalid conversation (the template's ``raise_exception`` message), or a template that fails."""


__all__ = ["ChatTemplateError", "render_builtin"]

_UNDEF = object()

TOOLS_HEADER = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
TOOLS_FOOTER = (
    "\n</tools>"
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
    "</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\n"
    "that can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be "
    "nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function "
    "call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)


def _get(obj: Any, name: str) -> Any:
    """``obj.name`` as jinja reads it on a dict (a missing key is undefined)."""
    if isinstance(obj, Mapping):
        return obj.get(name, _UNDEF)
    return getattr(obj, name, _UNDEF)


def _text(value: Any) -> str:
    """``{{ value }}``: undefined renders as nothing, anything else as ``str()``."""
    return "" if value is _UNDEF else str(value)


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _is_sequence(value: Any) -> bool:
    try:
        len(value)
        value.__getitem__  # noqa: B018
    except Exception:
        return False
    return True


def _is_iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


class _Renderer:
    def __init__(self, add_vision_id: Any):
        self.add_vision_id = False if add_vision_id is _UNDEF else bool(add_vision_id)
        self.image_count = 0
        self.video_count = 0

    def content(self, content: Any, do_vision_count: bool, is_system: bool = False) -> str:
        if isinstance(content, str):
            return content
        if _is_iterable(content) and not isinstance(content, Mapping):
            out = []
            for item in content:
                try:
                    is_image = "image" in item or "image_url" in item or _get(item, "type") == "image"
                    is_video = (not is_image) and ("video" in item or _get(item, "type") == "video")
                    is_text = (not is_image) and (not is_video) and "text" in item
                except TypeError:
                    raise ChatTemplateError("Unexpected item type in content.") from None
                if is_image:
                    if is_system:
                        raise ChatTemplateError("System message cannot contain images.")
                    if do_vision_count:
                        self.image_count += 1
                    if self.add_vision_id:
                        out.append(f"Picture {self.image_count}: ")
                    out.append("<|vision_start|><|image_pad|><|vision_end|>")
                elif is_video:
                    if is_system:
                        raise ChatTemplateError("System message cannot contain videos.")
                    if do_vision_count:
                        self.video_count += 1
                    if self.add_vision_id:
                        out.append(f"Video {self.video_count}: ")
                    out.append("<|vision_start|><|video_pad|><|vision_end|>")
                elif is_text:
                    out.append(_text(_get(item, "text")))
                else:
                    raise ChatTemplateError("Unexpected item type in content.")
            return "".join(out)
        if content is None or content is _UNDEF:
            return ""
        raise ChatTemplateError("Unexpected content type.")


def _tool_call_text(call: Any, first: bool, content: str) -> str:
    fn = _get(call, "function")
    if fn is not _UNDEF:
        call = fn
    name = _get(call, "name")
    if not isinstance(name, str):
        raise ChatTemplateError(f"tool call has no function name: {call!r:.200}")
    if first:
        head = "\n\n<tool_call>\n<function=" if content.strip() else "<tool_call>\n<function="
    else:
        head = "\n<tool_call>\n<function="
    out = [head, name, ">\n"]
    args = _get(call, "arguments")
    if args is not _UNDEF:
        if not isinstance(args, Mapping):
            raise ChatTemplateError(f"tool call arguments must be a mapping, got {type(args).__name__}")
        for key, value in args.items():
            if not isinstance(key, str):
                raise ChatTemplateError(f"tool call argument names must be strings, got {key!r}")
            out.append("<parameter=" + key + ">\n")
            if isinstance(value, Mapping) or (_is_sequence(value) and not isinstance(value, str)):
                out.append(_tojson(value))
            else:
                out.append(str(value))
            out.append("\n</parameter>\n")
    out.append("</function>\n</tool_call>")
    return "".join(out)


def render_builtin(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render like the official template. Extra keyword arguments the template does not read are ignored."""
    r = _Renderer(kwargs.get("add_vision_id", _UNDEF))
    enable_thinking = kwargs.get("enable_thinking", _UNDEF)
    if not messages:
        raise ChatTemplateError("No messages provided.")
    out: list[str] = []
    first = messages[0]
    first_is_system = _get(first, "role") == "system"
    if tools and _is_iterable(tools) and not isinstance(tools, Mapping):
        out.append("<|im_start|>system\n")
        out.append(TOOLS_HEADER)
        for tool in tools:
            out.append("\n")
            out.append(_tojson(tool))
        out.append(TOOLS_FOOTER)
        if first_is_system:
            sys_text = r.content(_get(first, "content"), False, True).strip()
            if sys_text:
                out.append("\n\n" + sys_text)
        out.append("<|im_end|>\n")
    elif first_is_system:
        sys_text = r.content(_get(first, "content"), False, True).strip()
        out.append("<|im_start|>system\n" + sys_text + "<|im_end|>\n")

    multi_step_tool = True
    last_query_index = len(messages) - 1
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if multi_step_tool and _get(message, "role") == "user":
            text = r.content(_get(message, "content"), False).strip()
            if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
                multi_step_tool = False
                last_query_index = index
    if multi_step_tool:
        raise ChatTemplateError("No user query found in messages.")

    n = len(messages)
    for i, message in enumerate(messages):
        content = r.content(_get(message, "content"), True).strip()
        role = _get(message, "role")
        if role == "system":
            if i != 0:
                raise ChatTemplateError("System message must be at the beginning.")
        elif role == "user":
            out.append("<|im_start|>" + role + "\n" + content + "<|im_end|>" + "\n")
        elif role == "assistant":
            reasoning = ""
            given = _get(message, "reasoning_content")
            if isinstance(given, str):
                reasoning = given
            elif "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            reasoning = reasoning.strip()
            if i > last_query_index:
                out.append("<|im_start|>" + role + "\n<think>\n" + reasoning + "\n</think>\n\n" + content)
            else:
                out.append("<|im_start|>" + role + "\n" + content)
            calls = _get(message, "tool_calls")
            if calls is not _UNDEF and calls and _is_iterable(calls) and not isinstance(calls, Mapping):
                for k, call in enumerate(calls):
                    out.append(_tool_call_text(call, k == 0, content))
            out.append("<|im_end|>\n")
        elif role == "tool":
            if i > 0 and messages[i - 1] and _get(messages[i - 1], "role") != "tool":
                out.append("<|im_start|>user")
            out.append("\n<tool_response>\n" + content + "\n</tool_response>")
            if i < n - 1 and _get(messages[i + 1], "role") != "tool":
                out.append("<|im_end|>\n")
            elif i == n - 1:
                out.append("<|im_end|>\n")
        else:
            raise ChatTemplateError("Unexpected message role.")

    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
        if enable_thinking is False:
            out.append("<think>\n\n</think>\n\n")
        else:
            out.append("<think>\n")
    return "".join(out)
