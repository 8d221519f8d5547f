"""`SamplingParams`: how one request is sampled and when it stops (vLLM's names and meanings).

Processing order of the logits of one step (see `qwen35.engine.sampler`):
  1. `min_tokens`: while fewer tokens than that are generated, EOS and `stop_token_ids` are masked out;
  2. penalties: `repetition_penalty` (over prompt and output tokens, divides positive logits and multiplies
     negative ones), then `frequency_penalty` (minus count in the output) and `presence_penalty` (minus 1 if in
     the output);
  3. `temperature` 0 (greedy): argmax. Otherwise divide by `temperature`, then `min_p` (drop tokens whose
     probability is below `min_p` times the best one), `top_k` (keep the k best logits), `top_p` (keep the
     smallest set of best tokens whose probability reaches `top_p`, renormalised after top-k), then sample.
Logprobs (`logprobs=N`) are those of the raw model distribution (log-softmax of the unprocessed logits), as
vLLM's default `raw_logprobs` mode. Tokens the engine inserts itself (the end of reasoning forced by a spent
`thinking_budget`) were not sampled: their entry is {token: Logprob(0.0, rank=None)}.
Prompt logprobs (`prompt_logprobs=N`): for every prompt position after the first, the logprob of the prompt token
there and the N most likely tokens (raw distribution too), computed in the prompt's own forward; such a request
does not start from the prefix cache (cached positions have no logits; see `LLMEngine`).
Structured output (`structured_outputs=StructuredOutputsParams(...)`): before step 1, tokens the grammar forbids
get probability 0 (on greedy rows too); logprobs are then those of that masked distribution, as vLLM reports
them. See `qwen35.engine.structured`.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: below this a temperature means greedy decoding (vLLM's _SAMPLING_EPS)
SAMPLING_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What `LLMEngine.step()` reports for a request (vLLM's names).

    CUMULATIVE: everything generated so far, every step. DELTA: only what is new since the last report
    (for streaming). FINAL_ONLY: one report, when the request finishes."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on what a request may generate (vLLM's names and meanings); exactly one is set:

    `json`: a JSON schema (a dict, or its JSON text); `json_object`: True for any JSON object; `regex`: a regular
    expression the whole output matches (Rust `regex` syntax); `choice`: the output is one of these strings;
    `grammar`: a Lark grammar as llguidance reads it (rule `start`; GBNF, as llama.cpp writes it, is converted).
    Shape errors raise ValueError naming the field; a schema / regex / grammar that does not compile raises when
    the engine receives the request (`LLMEngine.add_request`). With thinking on (the prompt leaves `<think>`
    open), the reasoning is free and the constraint applies after `</think>`."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("StructuredOutputsParams needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        kind = given[0]

        def bad(what: str) -> ValueError:
            return ValueError(f"structured_outputs.{kind} {what}, got {getattr(self, kind)!r:.200}")

        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise bad("must be a JSON schema (an object)")
        elif kind == "json_object":
            if self.json_object is not True:
                raise bad("must be true")
        elif kind == "choice":
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise bad("must be a non-empty list of strings")
            if not all(isinstance(c, str) for c in self.choice):
                raise bad("must hold strings only")
            object.__setattr__(self, "choice", tuple(self.choice))
        elif not isinstance(getattr(self, kind), str) or not getattr(self, kind):
            raise bad("must be a non-empty string")

    @property
    def kind(self) -> str:
        """Which of the five fields is set."""
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A hashable identity of the constraint (the compiled-grammar cache's key). A schema keeps its key order:
        it is the order the properties are written in."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        elif kind == "choice":
            value = json.dumps(list(value), ensure_ascii=False)
        return kind, str(value)

    @classmethod
    def coerce(cls, value: Any, name: str = "structured_outputs") -> StructuredOutputsParams | None:
        """None, a StructuredOutputsParams, or a dict of its fields (e.g. a request body's)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(STRUCTURED_KINDS)
            if unknown:
                raise ValueError(f"{name} has unknown fields {sorted(unknown)}; expected one of "
                                 f"{', '.join(STRUCTURED_KINDS)}")
            return cls(**{k: v for k, v in value.items() if v is not None})
        raise ValueError(f"{name} must be a StructuredOutputsParams or a dict, got {type(value).__name__}")


@dataclass
class SamplingParams:
    """Sampling and stopping for one request. Invalid values raise `ValueError` naming the field.

    `seed`: the random stream of this request (with `n` > 1, completion i uses `seed + i`); without one the
    stream comes from the engine's seed. Either way a request samples the same tokens alone or batched.
    `thinking_budget` (alias `max_thinking_tokens`): at most this many tokens inside `<think>...</think>`;
    when the budget is spent the engine closes the reasoning itself (it forces the end-of-thinking tokens) and
    the answer follows. None: no limit.
    `structured_outputs`: a `StructuredOutputsParams` (or a dict of its fields): what the output must match.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    thinking_budget: int | None = None
    max_thinking_tokens: int | None = field(default=None, repr=False)  # alias of thinking_budget
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop else []
        self.stop_token_ids = [int(t) for t in self.stop_token_ids] if self.stop_token_ids else []
        if self.max_thinking_tokens is not None:
            if self.thinking_budget is not None and self.thinking_budget != self.max_thinking_tokens:
                raise ValueError("thinking_budget and max_thinking_tokens are the same setting; give one")
            self.thinking_budget = self.max_thinking_tokens
        self.max_thinking_tokens = self.thinking_budget
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        if self.temperature < SAMPLING_EPS:
            # Greedy: the truncations cannot change the argmax; reset them so the sampler skips them.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _validate(self) -> None:
        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ValueError(f"SamplingParams.{name} {what}, got {getattr(self, name)!r}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            need(is_num(v) and -2.0 <= v <= 2.0, name, "must be in [-2, 2]")
        need(is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 1, or 0 / -1 (disabled)")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(self.seed is None or is_int(self.seed), "seed", "must be an integer or None")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative token ids")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
             "must be an integer >= 1 or None")
        need(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None:
            need(self.min_tokens <= self.max_tokens, "min_tokens", f"must be <= max_tokens={self.max_tokens}")
        need(self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0), "logprobs",
             "must be an integer >= 0 or None")
        need(self.prompt_logprobs is None or (is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
             "prompt_logprobs", "must be an integer >= 0 (the top-N besides the prompt token) or None")
        need(self.thinking_budget is None or (is_int(self.thinking_budget) and self.thinking_budget >= 0),
             "thinking_budget", "must be an integer >= 0 or None")
        if isinstance(self.output_kind, str):
            try:
                self.output_kind = RequestOutputKind[self.output_kind.upper()]
            except KeyError:
                need(False, "output_kind", "must be 'cumulative', 'delta' or 'final_only'")
        need(isinstance(self.output_kind, RequestOutputKind), "output_kind", "must be a RequestOutputKind")
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)

    # ---------------------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def clone(self, **changes: Any) -> SamplingParams:
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "max_thinking_tokens"}
        kw.update(changes)
        if "max_thinking_tokens" in changes:
            kw["thinking_budget"] = None
        return SamplingParams(**kw)

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any] | str | Path | None,
                               **overrides: Any) -> SamplingParams:
        """Defaults of a checkpoint (`generation_config.json`: temperature, top_p, top_k, min_p,
        repetition_penalty; `do_sample: false` means greedy), then `overrides`. EOS ids are not sampling
        parameters: the engine reads them from the same file (`load_generation_config`)."""
        gen = load_generation_config(generation_config) if not isinstance(generation_config, dict) else \
            generation_config
        kw: dict[str, Any] = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if gen.get(key) is not None:
                kw[key] = gen[key]
        if gen.get("do_sample") is False:
            kw["temperature"] = 0.0
        if gen.get("max_new_tokens") is not None:
            kw["max_tokens"] = int(gen["max_new_tokens"])
        kw.update(overrides)
        return cls(**kw)


def load_generation_config(path: str | Path | None) -> dict[str, Any]:
    """The `generation_config.json` of a checkpoint folder as a dict ({} when there is none)."""
    if path is None:
        return {}
    p = Path(path)
    if p.is_dir():
        p = p / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def eos_ids_from_generation_config(gen: dict[str, Any]) -> tuple[int, ...] | None:
    eos = gen.get("eos_token_id")
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list) and eos:
        return tuple(int(e) for e in eos)
    return None


__all__ = ["SamplingParams", "StructuredOutputsParams", "RequestOutputKind", "SAMPLING_EPS", "load_generation_config",
           "eos_ids_from_generation_config"]
