"""Reasoning and tool-call parsing of Qwen3.5 output, whole (:func:`parse`) and streamed
(:class:`StreamParser`).

The rules (both implementations follow them; the tests hold the stream to the whole parse):

* ``thinking=True`` means the prompt already opened ``<think>`` (the official template's default): the output
  starts as reasoning. ``thinking=False`` (``enable_thinking=False``, or a template that does not open it):
  the output starts as content, unless it starts (after whitespace) with ``<think>``, which opens reasoning.
* Reasoning ends at ``</think>``, or at ``<tool_call>``: a tool call written inside the think block ends the
  reasoning and is a real call. Output that never closes the think block (``max_tokens`` hit) is all
  reasoning.
* ``<think>`` and ``</think>`` never appear in reasoning or content: stray ones are dropped.
* A tool call is ``<tool_call>`` ``<function=NAME>`` (``<parameter=ARG>`` VALUE ``</parameter>``)*
  ``</function>`` ``</tool_call>``, whitespace between the parts. A string value is the raw text with one
  leading and one trailing newline removed; other values are typed by the tool's JSON schema (integer, number,
  boolean, null, object, array); a value that does not parse as its type stays the raw string. Values of
  parameters the schema does not describe are strings. With ``tools`` None or empty, function names are not
  checked. A final ``</parameter>`` missing right before ``</function>`` is tolerated.
* A call that is malformed, unknown (name not in ``tools``), truncated (no ``</tool_call>``), or interrupted
  by another ``<tool_call>`` or a think tag is never dropped: its raw text, tags included, is content.
* Text before the first call is content. Text between or after calls is content unless it is only whitespace.
* ``reasoning_content`` and ``content`` are stripped of leading and trailing whitespace as a whole, and are
  None when empty (as vLLM). ``tool_calls`` is always a list (empty when there are none).
* Tool calls are OpenAI-shaped: ``{"id", "type": "function", "function": {"name", "arguments"}}`` where
  ``arguments`` is a JSON string (keys in the order written, non-ASCII kept).

Streaming emits each tool call whole, when its ``</tool_call>`` arrives (a call is only known to be valid
then, so a call is never announced and later retracted). Reasoning and content stream as they come, except
text that might be the start of a tag, and whitespace that might turn out to be trailing, which are held back.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tags import CALL_CLOSE, CALL_OPEN, TAGS, THINK_CLOSE, THINK_OPEN

__all__ = [
    "ParsedOutput",
    "StreamParser",
    "TAGS",
    "parse",
    "parse_tool_call_block",
    "prompt_opens_thinking",
]

_TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")

ToolCallId = Callable[[int], str]


def _random_id(index: int) -> str:
    return "call_" + secrets.token_hex(12)


# ----------------------------------------------------------------------------------------------------
# Result


@dataclass
class ParsedOutput:
    """What the model said: ``reasoning_content`` (None if none), ``content`` (None if none) and
    ``tool_calls`` (a list of OpenAI tool-call dicts, possibly empty)."""

    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """An assistant message for the conversation history (what :func:`qwen35.chat.render` accepts)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [json.loads(json.dumps(c)) for c in self.tool_calls]
        return msg

    @classmethod
    def from_deltas(cls, deltas: Iterable[Mapping[str, Any]]) -> ParsedOutput:
        """Accumulate stream deltas (from :class:`StreamParser`) into the whole result."""
        reasoning: list[str] = []
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        for d in deltas:
            if d.get("reasoning_content"):
                reasoning.append(d["reasoning_content"])
            if d.get("content"):
                content.append(d["content"])
            for tc in d.get("tool_calls") or ():
                slot = calls.setdefault(
                    tc["index"], {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                if tc.get("id"):
                    slot["id"] = tc["id"]
                if tc.get("type"):
                    slot["type"] = tc["type"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["function"]["arguments"] += fn["arguments"]
        return cls(
            reasoning_content="".join(reasoning) or None,
            content="".join(content) or None,
            tool_calls=[calls[i] for i in sorted(calls)],
        )


# ----------------------------------------------------------------------------------------------------
# Tools and values


def _tool_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """name -> parameters schema; None when names are not to be checked."""
    if not tools:
        return None
    out: dict[str, dict[str, Any]] = {}
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise TypeError(f"a tool must be a dict, got {type(tool).__name__}")
        fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
        name = fn.get("name")
        if not isinstance(name, str):
            raise ValueError(f"tool without a function name: {tool!r:.200}")
        params = fn.get("parameters")
        out[name] = dict(params) if isinstance(params, Mapping) else {}
    return out


_JSON_TYPES = ("null", "boolean", "integer", "number", "object", "array", "string")


def _schema_types(schema: Any) -> set[str]:
    if not isinstance(schema, Mapping):
        return set()
    types: set[str] = set()
    t = schema.get("type")
    if isinstance(t, str):
        types.add(t)
    elif isinstance(t, list):
        types.update(x for x in t if isinstance(x, str))
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            types |= _schema_types(sub)
    if not types:
        values = list(schema.get("enum") or ())
        if "const" in schema:
            values.append(schema["const"])
        for v in values:
            if v is None:
                types.add("null")
            elif isinstance(v, bool):
                types.add("boolean")
            elif isinstance(v, int):
                types.add("integer")
            elif isinstance(v, float):
                types.add("number")
            elif isinstance(v, str):
                types.add("string")
            elif isinstance(v, list):
                types.add("array")
            elif isinstance(v, dict):
                types.add("object")
        if "properties" in schema:
            types.add("object")
        if "items" in schema:
            types.add("array")
    return types & set(_JSON_TYPES)


_INT_RE = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUM_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_MISSING = object()


def _convert(raw: str, schema: Any) -> Any:
    """Type one parameter value by its JSON schema; the raw string when no type applies."""
    types = _schema_types(schema)
    s = raw.strip()
    if "null" in types and s == "null":
        return None
    if not types or "string" in types:
        return raw
    if "boolean" in types and s.lower() in ("true", "false"):
        return s.lower() == "true"
    if "integer" in types and _INT_RE.fullmatch(s):
        return int(s)
    if ("number" in types or "integer" in types) and _NUM_RE.fullmatch(s):
        v = float(s)
        if math.isfinite(v):
            if "number" in types:
                return int(s) if _INT_RE.fullmatch(s) else v
            if v.is_integer():
                return int(v)
    if "object" in types or "array" in types:
        try:
            v = json.loads(s)
        except ValueError:
            v = _MISSING
        if ("object" in types and isinstance(v, dict)) or ("array" in types and isinstance(v, list)):
            return v
    return raw


_FUNC_RE = re.compile(r"\s*<function=([^>\n]*)>(.*)</function>\s*", re.S)
_PARAM_RE = re.compile(r"\s*<parameter=([^>\n]*)>(.*?)</parameter>", re.S)
_LAST_PARAM_RE = re.compile(r"\s*<parameter=([^>\n]*)>((?:(?!</?parameter[=>]).)*)", re.S)


def _strip_one_newline(v: str) -> str:
    if v.startswith("\n"):
        v = v[1:]
    if v.endswith("\n"):
        v = v[:-1]
    return v


def parse_tool_call_block(
    block: str, schemas: dict[str, dict[str, Any]] | None
) -> tuple[str, dict[str, Any]] | None:
    """``<tool_call>...</tool_call>`` -> (name, typed arguments), or None if it is malformed or unknown."""
    if not (block.startswith(CALL_OPEN) and block.endswith(CALL_CLOSE)):
        return None
    inner = block[len(CALL_OPEN) : -len(CALL_CLOSE)]
    m = _FUNC_RE.fullmatch(inner)
    if m is None:
        return None
    name = m.group(1).strip()
    body = m.group(2)
    if not name or "<function=" in body or "</function>" in body:
        return None
    if schemas is not None and name not in schemas:
        return None
    props = (schemas or {}).get(name, {}).get("properties")
    props = props if isinstance(props, Mapping) else {}
    args: dict[str, Any] = {}
    pos = 0
    while True:
        pm = _PARAM_RE.match(body, pos)
        if pm is None:
            break
        key = pm.group(1).strip()
        if not key:
            return None
        args[key] = _convert(_strip_one_newline(pm.group(2)), props.get(key))
        pos = pm.end()
    rest = body[pos:]
    if rest.strip():
        pm = _LAST_PARAM_RE.fullmatch(rest)  # the last parameter without its closing tag
        if pm is None or not pm.group(1).strip():
            return None
        key = pm.group(1).strip()
        args[key] = _convert(_strip_one_newline(pm.group(2)), props.get(key))
    return name, args


def _make_call(index: int, name: str, args: dict[str, Any], ids: ToolCallId) -> dict[str, Any]:
    return {
        "id": ids(index),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
    }


# ----------------------------------------------------------------------------------------------------
# Whole text


def parse(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool = True,
    *,
    tool_call_id: ToolCallId | None = None,
) -> ParsedOutput:
    """Split a finished output into reasoning, content and tool calls (rules in the module docstring).

    ``tool_call_id(index)`` makes the call ids (default: random ``call_<24 hex>``).
    """
    schemas = _tool_schemas(tools)
    ids = tool_call_id or _random_id
    reasoning: list[str] = []
    content: list[str] = []
    calls: list[dict[str, Any]] = []

    rest = text.lstrip()
    if rest.startswith(THINK_OPEN):
        rest = rest[len(THINK_OPEN) :]
        state = "reasoning"
    else:
        state = "reasoning" if thinking else "content"

    call: list[str] = []  # raw text of the open call
    segment: list[str] = []  # text after a call

    def close_segment() -> None:
        s = "".join(segment)
        if s.strip():
            content.append(s)
        segment.clear()

    for i, piece in enumerate(_TAG_RE.split(rest)):
        if not piece:
            continue
        is_tag = i % 2 == 1
        if not is_tag or (piece == CALL_CLOSE and state != "call"):
            # plain text (a stray </tool_call> outside a call is text too)
            if state == "reasoning":
                reasoning.append(piece)
            elif state == "content":
                content.append(piece)
            elif state == "call":
                call.append(piece)
            else:
                segment.append(piece)
            continue
        if state == "call":
            if piece == CALL_CLOSE:
                raw = "".join(call) + CALL_CLOSE
                parsed = parse_tool_call_block(raw, schemas)
                if parsed is None:
                    content.append(raw)
                else:
                    calls.append(_make_call(len(calls), parsed[0], parsed[1], ids))
                call = []
                state = "after"
            elif piece == CALL_OPEN:
                content.append("".join(call))
                call = [CALL_OPEN]
            else:  # a think tag interrupts the call
                content.append("".join(call))
                call = []
                state = "after"
            continue
        if piece == CALL_OPEN:
            if state == "after":
                close_segment()
            call = [CALL_OPEN]
            state = "call"
        elif piece == THINK_CLOSE and state == "reasoning":
            state = "content"
        # other think tags: dropped

    if state == "call":
        content.append("".join(call))
    elif state == "after":
        close_segment()
    return ParsedOutput(
        reasoning_content="".join(reasoning).strip() or None,
        content="".join(content).strip() or None,
        tool_calls=calls,
    )


# ----------------------------------------------------------------------------------------------------
# Streaming


class _Stripper:
    """Streams ``"".join(pieces).strip()``: drops leading whitespace, holds trailing whitespace."""

    __slots__ = ("started", "held")

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def push(self, s: str) -> str:
        if not self.started:
            s = s.lstrip()
            if not s:
                return ""
            self.started = True
        s = self.held + s
        t = s.rstrip()
        self.held = s[len(t) :]
        return t


def _held_tag_prefix(buf: str, start: int) -> int:
    """Index from which ``buf`` might be the start of a tag cut off at the end (len(buf) if none)."""
    i = buf.find("<", max(start, len(buf) - max(len(t) for t in TAGS) + 1))
    while i != -1:
        tail = buf[i:]
        if any(t.startswith(tail) for t in TAGS):
            return i
        i = buf.find("<", i + 1)
    return len(buf)


class StreamParser:
    """Incremental :func:`parse`: ``feed(text)`` pieces of output as they are decoded, then ``finish()``.

    Each call returns a list of OpenAI-style deltas, dicts with one of ``reasoning_content``, ``content`` or
    ``tool_calls`` (``[{"index", "id", "type", "function": {"name", "arguments"}}]``, each call whole).
    However the text is cut, the accumulated deltas (:meth:`ParsedOutput.from_deltas`) equal
    ``parse(full_text)``.
    """

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = True,
        *,
        tool_call_id: ToolCallId | None = None,
    ):
        self._schemas = _tool_schemas(tools)
        self._ids = tool_call_id or _random_id
        self._thinking = thinking
        self._state = "start"
        self._buf = ""
        self._reasoning = _Stripper()
        self._content = _Stripper()
        self._call: list[str] = []
        self._segment = ""
        self._segment_live = False
        self._n_calls = 0
        self._out: list[dict[str, Any]] = []
        self._finished = False
        self._fed: list[str] = []

    @property
    def in_reasoning(self) -> bool:
        """True while the output is still in the think block."""
        return self._state in ("start", "reasoning") and (self._state != "start" or self._thinking)

    @property
    def text(self) -> str:
        """Everything fed so far."""
        if len(self._fed) > 1:
            self._fed = ["".join(self._fed)]
        return self._fed[0] if self._fed else ""

    @property
    def num_tool_calls(self) -> int:
        return self._n_calls

    # ---- public
    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._finished:
            raise RuntimeError("StreamParser.feed() after finish()")
        if text:
            self._fed.append(text)
            self._buf += text
            self._run(final=False)
        return self._take()

    def finish(self) -> list[dict[str, Any]]:
        if self._finished:
            return []
        self._run(final=True)
        if self._state == "call":
            self._emit_content("".join(self._call))
            self._call = []
        self._finished = True
        return self._take()

    # ---- internals
    def _take(self) -> list[dict[str, Any]]:
        out, self._out = self._out, []
        return out

    def _emit_text(self, key: str, s: str) -> None:
        if not s:
            return
        if self._out and key in self._out[-1] and key != "tool_calls":
            self._out[-1][key] += s
        else:
            self._out.append({key: s})

    def _emit_content(self, s: str) -> None:
        self._emit_text("content", self._content.push(s))

    def _run(self, final: bool) -> None:
        while True:
            buf = self._buf
            if self._state == "start":
                stripped = buf.lstrip()
                if not stripped and not final:
                    self._buf = ""
                    return
                if stripped.startswith(THINK_OPEN):
                    self._buf = stripped[len(THINK_OPEN) :]
                    self._state = "reasoning"
                    continue
                if THINK_OPEN.startswith(stripped) and stripped and not final:
                    self._buf = stripped
                    return
                self._buf = stripped
                self._state = "reasoning" if self._thinking else "content"
                continue
            # earliest complete tag
            m = _TAG_RE.search(buf)
            if m is not None:
                self._text(buf[: m.start()])
                self._buf = buf[m.end() :]
                self._tag(m.group(0))
                continue
            cut = len(buf) if final else _held_tag_prefix(buf, 0)
            self._text(buf[:cut])
            self._buf = buf[cut:]
            return

    def _text(self, s: str) -> None:
        if not s:
            return
        state = self._state
        if state == "reasoning":
            self._emit_text("reasoning_content", self._reasoning.push(s))
        elif state == "content":
            self._emit_content(s)
        elif state == "call":
            self._call.append(s)
        else:  # after a call
            if self._segment_live:
                self._emit_content(s)
            else:
                self._segment += s
                if self._segment.strip():
                    self._segment_live = True
                    self._emit_content(self._segment)
                    self._segment = ""

    def _open_call(self) -> None:
        self._call = [CALL_OPEN]
        self._state = "call"

    def _after(self) -> None:
        self._state = "after"
        self._segment = ""
        self._segment_live = False

    def _tag(self, tag: str) -> None:
        state = self._state
        if state == "call":
            if tag == CALL_CLOSE:
                raw = "".join(self._call) + CALL_CLOSE
                self._call = []
                parsed = parse_tool_call_block(raw, self._schemas)
                if parsed is None:
                    self._emit_content(raw)
                else:
                    call = _make_call(self._n_calls, parsed[0], parsed[1], self._ids)
                    self._out.append({"tool_calls": [{"index": self._n_calls, **call}]})
                    self._n_calls += 1
                self._after()
            elif tag == CALL_OPEN:
                self._emit_content("".join(self._call))
                self._open_call()
            else:
                self._emit_content("".join(self._call))
                self._call = []
                self._after()
            return
        if tag == CALL_CLOSE:
            self._text(tag)
        elif tag == CALL_OPEN:
            self._open_call()
        elif tag == THINK_CLOSE and state == "reasoning":
            self._state = "content"
        # other think tags: dropped


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves a think block open (its last ``<think>`` comes after its last
    ``</think>``): the ``thinking`` argument to give :func:`parse` / :class:`StreamParser` for its output."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)
