"""Chat templates: render messages to a prompt, with a checkpoint's jinja template or the built-in renderer.

``render(messages, tools, add_generation_prompt, template=None, **template_kwargs)``:

* ``template`` given (the text of ``chat_template.jinja`` or the ``chat_template`` of
  ``tokenizer_config.json``): rendered in a sandboxed jinja2 environment that behaves as the one of
  ``transformers``
  (``trim_blocks``/``lstrip_blocks``, loop controls, ``tojson`` without ASCII or HTML escaping,
  ``raise_exception``, ``strftime_now``, a no-op ``{% generation %}`` block);
* ``template=None``: :func:`qwen35.chat.builtin.render_builtin`, Python written to be byte-identical to the
  official Qwen3.5 template.

Both paths see the same messages, normalised first as serving stacks do: keys whose value is None are dropped,
``thinking``/``reasoning`` are accepted as names of ``reasoning_content``, and tool-call ``arguments`` given
as a JSON string (the OpenAI wire form) are parsed into a dict (the official template iterates them as a
mapping). Errors raised by the template (``raise_exception``) come out as :class:`ChatTemplateError`, a
``ValueError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from .builtin import ChatTemplateError, render_builtin

__all__ = ["ChatTemplateError", "load_chat_template", "normalize_messages", "render", "render_jinja"]


_REASONING_ALIASES = ("reasoning_content", "reasoning", "thinking")


def _normalize_tool_call(call: Any) -> Any:
    if not isinstance(call, Mapping):
        return call
    call = dict(call)
    fn = call.get("function")
    target = call
    if isinstance(fn, Mapping):
        fn = dict(fn)
        call["function"] = fn
        target = fn
    args = target.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise ChatTemplateError(f"tool call arguments are not valid JSON: {args[:200]!r}") from e
        if not isinstance(parsed, Mapping):
            raise ChatTemplateError(f"tool call arguments must be a JSON object, got {args[:200]!r}")
        target["arguments"] = parsed
    return call


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as the template sees them (see the module docstring). The caller's objects are not
    modified."""
    out = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(m).__name__}: {m!r:.200}")
        msg = {k: v for k, v in m.items() if v is not None}
        if "reasoning_content" not in msg:
            for alias in _REASONING_ALIASES[1:]:
                if isinstance(msg.get(alias), str):
                    msg["reasoning_content"] = msg[alias]
                    break
        calls = msg.get("tool_calls")
        if isinstance(calls, (list, tuple)):
            msg["tool_calls"] = [_normalize_tool_call(c) for c in calls]
        out.append(msg)
    return out


# ----------------------------------------------------------------------------------------------------
# jinja


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses it for masks)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def render_jinja(
    template: str, messages: list[dict], tools=None, add_generation_prompt=True, **kwargs
) -> str:
    """Render an already normalised conversation with a jinja chat template."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(str(e)) from e
    except TypeError as e:  # e.g. a template filter applied to a value of the wrong type
        raise ChatTemplateError(f"chat template failed on this conversation: {e}") from e


# ----------------------------------------------------------------------------------------------------


def render(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    **template_kwargs: Any,
) -> str:
    """The prompt text for ``messages`` (OpenAI-style dicts).

    ``tools``: OpenAI tool dicts (``{"type": "function", "function": {...}}``), listed in the system turn.
    ``template_kwargs``: template variables, e.g. ``enable_thinking=False``, ``add_vision_id=True``.
    Invalid conversations raise :class:`ChatTemplateError` (a ``ValueError``) with the template's message.
    """
    msgs = normalize_messages(messages)
    tools_list = list(tools) if tools is not None else None
    if template is None:
        return render_builtin(
            msgs, tools=tools_list, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
    return render_jinja(
        template, msgs, tools=tools_list, add_generation_prompt=add_generation_prompt, **template_kwargs
    )


def load_chat_template(folder: str | os.PathLike | None) -> str | None:
    """The chat template a checkpoint folder ships: ``chat_template.jinja``, else ``chat_template.json``'s or
    ``tokenizer_config.json``'s ``chat_template`` (a string, or the entry named ``default`` of a list);
    None when there is none (then :func:`render` uses the built-in renderer)."""
    if folder is None:
        return None
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        with open(f, encoding="utf-8") as fh:
            value = json.load(fh).get("chat_template")
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            named = {d.get("name"): d.get("template") for d in value if isinstance(d, Mapping)}
            if isinstance(named.get("default"), str):
                return named["default"]
            raise ChatTemplateError(f"{f} has several chat templates and none is named 'default'")
    return None
