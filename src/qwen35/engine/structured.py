"""Structured output: grammars compiled with llguidance, one token mask per sequence and step.

    compiler = GrammarCompiler.for_tokenizer(tokenizer, vocab_size, eos_token_ids)
    state = compiler.new_state(StructuredOutputsParams(json=schema), thinking=False)
    allowed = state.allowed()      # bool [V] (None: unconstrained now), applied before any token is picked
    state.advance(token)           # every committed token, sampled or forced

What this module holds: the llguidance tokenizer (built once per tokenizer from our token bytes, so the ids are the
model's and the special tokens `<|im_end|>` / `<|endoftext|>` are the EOS that ends a finished grammar), the
grammars (compiled once per spec and kept in a bounded LRU; a sequence's matcher is a cheap copy of the compiled
one), the per-sequence state, and the grammar of Qwen3.5's XML tool calls (`tool_call_grammar`).

Why llguidance: its only runtime dependency is itself (a Rust extension; xgrammar needs torch, transformers and
triton at runtime), and its masks are computed on the CPU in tens to hundreds of microseconds for the 248K-token
vocabulary: measured here (Intel Xeon, 2 cores) 0.03-0.06 ms in JSON structure, ~0.25 ms inside a JSON string
(about 150K tokens allowed); with the bitmask turned into a bool row, 0.16 ms per decode step at batch 1 and
1.2 ms at batch 16, against 0.8B decode steps of 75 ms and 227 ms (`bench/structured.py`,
docs/benchmarks/structured.md).

Thinking: when the prompt leaves a think block open (its last `<think>` after its last `</think>`, the rule of
`qwen35.chat.prompt_opens_thinking`), the reasoning runs free and the grammar starts after the `</think>` token.
Qwen3.5 writes `</think>\\n\\n` (the thinking budget forces the same), so right after `</think>` up to
`MAX_LEADING_WHITESPACE` whitespace-only tokens are allowed besides the grammar's first tokens; they are not fed
to the grammar (the output text keeps them; the chat parser strips the content).

JSON schemas compile with fixed separators (`", "` and `": "`, whitespace not free): free whitespace lets weak or
small models fill the output with newlines (the failure vLLM's `disable_any_whitespace` works around); a schema's
own `"x-guidance"` options win over these defaults.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qwen35.chat.tags import CALL_CLOSE, CALL_OPEN, FUNCTION_OPEN, THINK_CLOSE, THINK_OPEN
from qwen35.engine.sampling import StructuredOutputsParams

log = logging.getLogger("qwen35")

#: compiled grammars kept per compiler (a compiled grammar is its lexer and parser tables: KBs to MBs)
GRAMMAR_CACHE_SIZE = 256
#: whitespace-only tokens allowed between `</think>` and the grammar's first token
MAX_LEADING_WHITESPACE = 2
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_WHITESPACE = frozenset(b" \t\r\n")


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency of the package: only a broken install lacks it
        raise ValueError(f"structured output needs the llguidance package ({e})") from None
    return llguidance


# ---------------------------------------------------------------------------------------------- grammar text
def grammar_of(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON grammar text) of a spec; ValueError naming the field when the spec cannot
    even be read (a grammar that reads but does not compile fails in `GrammarCompiler.compile`)."""
    llg = _llguidance()
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else spec.json
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.json: not a JSON schema: {e}") from None
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        return llg.LLMatcher.grammar_from_lark(choice_lark(spec.choice))
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(spec.grammar)  # Lark stays as it is; GBNF (llama.cpp's `root ::= ...`) is converted
    except Exception as e:  # the converter raises its own error types
        raise ValueError(f"structured_outputs.grammar: not a Lark or GBNF grammar: {e}") from None
    return llg.LLMatcher.grammar_from_lark(lark)


def choice_lark(choices: Iterable[str]) -> str:
    """`start: "a" | "b" ...` (JSON string escapes are Lark's too). An empty choice is an empty alternative."""
    alts = [json.dumps(c, ensure_ascii=False) if c else '""' for c in dict.fromkeys(choices)]
    return "start: " + " | ".join(alts) + "\n"


def _first_lines(message: str, n: int = 6) -> str:
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n])


# ---------------------------------------------------------------------------------------------- the compiler
class _TokenizerView:
    """What llguidance's TokenizerWrapper reads of a tokenizer: every id's bytes (the model's padding ids past the
    tokenizer are empty: never allowed), the special ids, and an encoder."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_id: int):
        table = list(tokenizer.token_bytes())
        self.tokens = table + [b""] * max(0, vocab_size - len(table))
        self.eos_token_id = eos_id
        self.bos_token_id = None
        self.special_token_ids = sorted(tokenizer.special_token_ids)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


class GrammarCompiler:
    """One tokenizer's llguidance tokenizer and its compiled grammars (an LRU of `GRAMMAR_CACHE_SIZE`)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]):
        llg = _llguidance()
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        view = _TokenizerView(tokenizer, self.vocab_size, self.eos_token_ids[0])
        self.ll_tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(view), n_vocab=len(view.tokens),
                                            eos_token=list(self.eos_token_ids))
        self.think_close_id = tokenizer.token_to_id(THINK_CLOSE)
        ws = np.zeros(self.vocab_size, dtype=np.bool_)
        special = tokenizer.special_token_ids
        for i, b in enumerate(view.tokens[:self.vocab_size]):
            if b and i not in special and _WHITESPACE.issuperset(b):
                ws[i] = True
        self.whitespace = torch.from_numpy(ws)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses), for tests and monitoring

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> GrammarCompiler:
        """The compiler of this tokenizer (built once: ~1 s for the 248K-token vocabulary), shared by engines."""
        key = (int(vocab_size), tuple(eos_token_ids))
        with _COMPILERS_LOCK:
            per = _COMPILERS.setdefault(tokenizer, {})
            if key not in per:
                per[key] = cls(tokenizer, vocab_size, eos_token_ids)
            return per[key]

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of `spec` (an llguidance matcher in its start state: copy it, never advance it);
        ValueError naming the field and the problem when it does not compile."""
        key = spec.key()
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
                return proto
        llg = _llguidance()
        grammar = grammar_of(spec)
        # compiling drops the GIL (10-100 ms for large schemas): other threads go on meanwhile
        proto = llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if proto.is_error():
            raise ValueError(f"structured_outputs.{spec.kind}: {_first_lines(proto.get_error())}")
        with self._lock:
            self.compiled += 1
            self._cache[key] = proto
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return proto

    def new_state(self, spec: StructuredOutputsParams, *, thinking: bool = False,
                  stop_token_ids: Iterable[int] = ()) -> GrammarState:
        """A sequence's grammar state. `thinking`: the prompt left a think block open (the grammar starts after
        `</think>`). `stop_token_ids`: ids that may end the output once the grammar is complete, besides EOS."""
        return GrammarState(self, self.compile(spec).deep_copy(), spec.kind, thinking=thinking,
                            stop_token_ids=stop_token_ids)


# ---------------------------------------------------------------------------------------------- one sequence
class GrammarState:
    """One sequence's position in its grammar. The matcher advances with every committed token (sampled or forced),
    so it survives preemption (the recompute adds no tokens) and speculative decoding is not needed: a sequence
    with a grammar gets no drafts (`LLMEngine._propose`)."""

    def __init__(self, compiler: GrammarCompiler, matcher: Any, kind: str, *, thinking: bool,
                 stop_token_ids: Iterable[int] = ()):
        self.compiler = compiler
        self.matcher = matcher
        self.kind = kind
        self.active = not thinking or compiler.think_close_id is None  # reasoning first: not yet
        self.leading_whitespace = 0  # whitespace tokens still allowed before the grammar's first token
        self.consumed = 0  # tokens fed to the matcher
        self.ended = False  # an EOS / stop token closed the complete grammar
        self.failed: str | None = None  # why the matcher left the grammar (a bug: the masks forbid it)
        end = set(compiler.eos_token_ids) | {int(t) for t in stop_token_ids}
        self.end_ids = torch.as_tensor(sorted(t for t in end if t < compiler.vocab_size), dtype=torch.long)
        self._end_set = frozenset(end)

    def allowed(self) -> torch.Tensor | None:
        """bool [V]: the tokens the grammar allows next (None while the reasoning runs free). Never empty: once
        the grammar is complete only the end tokens (EOS, the request's stop ids) are allowed."""
        if not self.active:
            return None
        V = self.compiler.vocab_size
        empty = True
        if self.failed is not None or self.ended:
            mask = torch.zeros(V, dtype=torch.bool)
        else:
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            empty = not bits.any()  # on the 31 KB of bits: a tenth of the time on the unpacked row
            mask = torch.from_numpy(np.unpackbits(bits, count=V, bitorder="little").view(np.bool_))
            if self.leading_whitespace and not self.consumed:
                mask |= self.compiler.whitespace
                empty = False
        if empty or self.matcher.is_accepting():
            mask[self.end_ids] = True
        return mask

    def advance(self, token: int) -> None:
        """Account for one committed token."""
        if not self.active:
            if token == self.compiler.think_close_id:
                self.active = True
                self.leading_whitespace = MAX_LEADING_WHITESPACE
            return
        if self.failed is not None or self.ended:
            return
        if not self.consumed and self.leading_whitespace:
            if token < self.compiler.vocab_size and bool(self.compiler.whitespace[token]):
                self.leading_whitespace -= 1
                return
            self.leading_whitespace = 0
        if token in self._end_set and self.matcher.is_accepting():
            self.ended = True
            return
        if not self.matcher.consume_token(token):
            self.failed = self.matcher.get_error() or f"token {token} is not allowed"
            log.warning("structured output: the %s grammar rejected token %d (%s); the sequence can only end now",
                        self.kind, token, _first_lines(self.failed, 2))
            return
        self.consumed += 1

    @property
    def complete(self) -> bool:
        """The output so far matches the whole grammar."""
        return self.active and (self.ended or self.matcher.is_accepting())


# ---------------------------------------------------------------------------------------------- tool calls
def _tool_functions(tools: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}] must be an object, got {type(tool).__name__}")
        fn = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
        name = fn.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in "<>\n"):
            raise ValueError(f"tools[{i}].function.name must be a non-empty name without '<', '>' or newlines, "
                             f"got {name!r}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append((name, dict(params or {})))
    return out


# Text a raw string value may not contain: the parser would cut the value, the call or the think block there.
_VALUE_BREAKERS = ("</parameter>", "</function>", FUNCTION_OPEN, CALL_OPEN, CALL_CLOSE, THINK_OPEN, THINK_CLOSE)


def _regex_escape(s: str) -> str:
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/-" else c for c in s)


def _string_value_lexeme(schema: Mapping[str, Any]) -> str:
    """A Lark terminal for a raw string parameter value: any text (within minLength / maxLength) without the
    tags that would end it early."""
    lo = schema.get("minLength", 0)
    hi = schema.get("maxLength")
    lo = lo if isinstance(lo, int) and not isinstance(lo, bool) and lo >= 0 else 0
    hi = hi if isinstance(hi, int) and not isinstance(hi, bool) and hi >= lo else None
    body = f"/(?s:.{{{lo},{'' if hi is None else hi}}})/" if (lo or hi is not None) else "/(?s:.*)/"
    breakers = "|".join(_regex_escape(b) for b in _VALUE_BREAKERS)
    return f"{body} & ~/(?s:.*)({breakers})(?s:.*)/"


def _param_schema_types(schema: Any) -> set[str]:
    from qwen35.chat.parser import _schema_types  # the parser's own reading of a schema's types

    return _schema_types(schema)


def _function_rules(index: int, name: str, params: Mapping[str, Any]) -> list[str]:
    """Lark rules of one function's call body `<function=NAME>\\n(<parameter=P>\\nVALUE\\n</parameter>\\n)*
    </function>`: every required property once, the others optional, in the schema's order. String values are
    raw text (as the parser reads them), the others JSON under the property's schema (llguidance's %json)."""
    props = params.get("properties") if isinstance(params.get("properties"), Mapping) else {}
    required = params.get("required") if isinstance(params.get("required"), list) else []
    missing = [r for r in required if r not in props]
    if missing:
        raise ValueError(f"tool {name!r}: required parameters {missing} have no schema under 'properties'")
    rules, parts = [], []
    for j, (pname, pschema) in enumerate(props.items()):
        if not isinstance(pname, str) or not pname or any(c in pname for c in "<>\n"):
            raise ValueError(f"tool {name!r}: parameter name {pname!r} must be non-empty, without '<', '>' or "
                             f"newlines")
        pschema = pschema if isinstance(pschema, Mapping) else {}
        rule = f"p_{index}_{j}"
        head = json.dumps(f"<parameter={pname}>\n", ensure_ascii=False)
        types = _param_schema_types(pschema)
        if not types or "string" in types:
            choices = None
            if types == {"string"} and isinstance(pschema.get("enum"), list) and \
                    all(isinstance(c, str) for c in pschema["enum"]):
                choices = pschema["enum"]
            elif types == {"string"} and isinstance(pschema.get("const"), str):
                choices = [pschema["const"]]
            if choices:
                alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices))
                rules.append(f'{rule}: {head} ({alts}) "\\n</parameter>\\n"')
            elif types == {"string"} and isinstance(pschema.get("pattern"), str):
                from llguidance import regex_to_lark

                rules.append(f'{rule}: {head} /{regex_to_lark(pschema["pattern"], "dw")}/ "\\n</parameter>\\n"')
            else:
                # lazy: the value ends at the first "\n</parameter>" (which the suffix writes)
                rules.append(f'{rule}: {head} v_{index}_{j} "\\n"')
                rules.append(f'v_{index}_{j}[suffix="\\n</parameter>"]: V_{index}_{j}')
                rules.append(f"V_{index}_{j}: {_string_value_lexeme(pschema if types == {'string'} else {})}")
        else:
            sub = dict(pschema)
            sub.setdefault("x-guidance", JSON_OPTIONS)
            rules.append(f'{rule}: {head} %json {json.dumps(sub, ensure_ascii=False)} "\\n</parameter>\\n"')
        parts.append(rule if pname in required else f"{rule}?")
    fn_head = json.dumps(f"{FUNCTION_OPEN}{name}>\n", ensure_ascii=False)
    rules.insert(0, f'f_{index}: {fn_head} {" ".join(parts)} "</function>"')
    return rules


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], tool_choice: Any = "required", *,
                      parallel_tool_calls: bool = True) -> StructuredOutputsParams:
    """The grammar of Qwen3.5's XML tool calls (`qwen35.chat.parser` reads them; `chat/builtin.py` writes them):
    `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>`, one call
    (or, with `parallel_tool_calls`, one or more separated by a newline), then EOS. `tool_choice`: "required" (any
    of `tools`) or a named tool (`{"type": "function", "function": {"name": ...}}` or the name itself). Every
    required property is present and every value matches its schema (string values raw, others JSON)."""
    functions = _tool_functions(tools or [])
    if tool_choice == "required":
        chosen = functions
    else:
        want = tool_choice
        if isinstance(tool_choice, Mapping):
            fn = tool_choice.get("function")
            want = fn.get("name") if isinstance(fn, Mapping) else tool_choice.get("name")
        chosen = [(n, p) for n, p in functions if n == want]
        if not chosen:
            raise ValueError(f"tool_choice names {want!r}, which is not among the tools "
                             f"({', '.join(n for n, _ in functions) or 'none given'})")
    if not chosen:
        raise ValueError("tool_choice 'required' needs at least one tool")
    rules = []
    for i, (name, params) in enumerate(chosen):
        rules.extend(_function_rules(i, name, params))
    call_open, call_close = json.dumps(CALL_OPEN + "\n"), json.dumps("\n" + CALL_CLOSE)
    start = 'start: call ("\\n" call)*' if parallel_tool_calls else "start: call"
    lines = [start, f"call: {call_open} ({' | '.join(f'f_{i}' for i in range(len(chosen)))}) {call_close}", *rules]
    return StructuredOutputsParams(grammar="%llguidance {}\n" + "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- request fields
def structured_from_response_format(obj: Any) -> StructuredOutputsParams | None:
    """OpenAI's `response_format` (a dict or a pydantic model): {"type": "text"} -> None; {"type": "json_object"};
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (the schema is enforced whatever
    `strict` says, as vLLM does). ValueError naming the field otherwise."""
    if obj is None:
        return None
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(exclude_none=True, by_alias=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"response_format must be an object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = obj.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ValueError("response_format.json_schema must be an object with 'name' and 'schema'")
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            schema = {}  # no schema: any JSON value
        if not isinstance(schema, (Mapping, bool)):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        try:
            return StructuredOutputsParams(json=dict(schema) if isinstance(schema, Mapping) else schema)
        except ValueError as e:
            raise ValueError(str(e).replace("structured_outputs.json", "response_format.json_schema.schema")) \
                from None
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def structured_from_request(structured_outputs: Any, response_format: Any) -> StructuredOutputsParams | None:
    """vLLM's `structured_outputs` field or OpenAI's `response_format` (not both) of a request body."""
    if hasattr(structured_outputs, "model_dump"):
        structured_outputs = structured_outputs.model_dump(exclude_none=True, by_alias=True)
    so = StructuredOutputsParams.coerce(structured_outputs or None)
    rf = structured_from_response_format(response_format)
    if so is not None and rf is not None:
        raise ValueError("give structured_outputs or response_format, not both")
    return so or rf


def structured_for_plan(plan: Any) -> StructuredOutputsParams | None:
    """The grammar of a planned chat request (`qwen35.chat.frontend.ChatPlan`): the tool-call grammar when the
    tool choice forces a call, else the answer's own structured output (or None)."""
    forced = getattr(plan, "forced_call", None)
    if forced:
        return tool_call_grammar(forced["tools"], forced["tool_choice"],
                                 parallel_tool_calls=forced["parallel_tool_calls"])
    return getattr(plan, "structured", None)


__all__ = ["GrammarCompiler", "GrammarState", "MAX_LEADING_WHITESPACE", "StructuredOutputsParams",
           "choice_lark", "grammar_of", "structured_from_request", "structured_for_plan",
           "structured_from_response_format", "tool_call_grammar"]
