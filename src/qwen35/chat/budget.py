"""Thinking budget: cap a request's reasoning at N tokens by forcing ``</think>\\n\\n`` (as llama.cpp's
``--reasoning-budget``).

The engine makes one :class:`ThinkingBudget` per request and calls :meth:`ThinkingBudget.step` with every
token the request generates; when it returns ids, the engine appends them to the output as if they had been
generated (no sampling) and goes on, so the answer starts. :meth:`ThinkingBudget.initial` covers a budget of 0
(force before the first token).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["ThinkingBudget"]

THINK_START_ID = 248068
THINK_END_ID = 248069
TOOL_CALL_ID = 248058


class ThinkingBudget:
    """Per-request reasoning cap.

    ``budget_tokens``: reasoning tokens allowed (None or negative: unlimited; 0: no reasoning at all).
    ``think_end_ids``: the ids forced when the budget is spent, e.g. ``encode("</think>\\n\\n")``.
    ``thinking``: whether the prompt opened a think block (the parsers' ``thinking``); when it did not,
    counting starts if the model writes ``think_start_id`` itself. ``stop_ids``: ids that end reasoning on
    their own (default: ``think_end_ids[0]`` and ``<tool_call>``, which also ends reasoning in the parser).
    Once the end is forced the controller is done, so feeding the forced ids back to :meth:`step` is harmless.
    """

    def __init__(
        self,
        budget_tokens: int | None,
        think_end_ids: Sequence[int],
        *,
        thinking: bool = True,
        think_start_id: int | None = THINK_START_ID,
        stop_ids: Iterable[int] | None = None,
    ):
        if not think_end_ids:
            raise ValueError("think_end_ids must not be empty")
        self.budget = None if budget_tokens is None or budget_tokens < 0 else int(budget_tokens)
        self.think_end_ids = [int(i) for i in think_end_ids]
        self.think_start_id = think_start_id
        stops = set(stop_ids) if stop_ids is not None else {self.think_end_ids[0], TOOL_CALL_ID}
        self.stop_ids = frozenset(stops)
        self.active = bool(thinking)  #: inside a think block
        self.done = False  #: reasoning is over (closed by the model or forced); nothing more will be forced
        self.forced = False  #: the budget ran out and the end was forced
        self.reasoning_tokens = 0

    @classmethod
    def for_tokenizer(
        cls, tokenizer, budget_tokens: int | None, *, thinking: bool = True, message: str = ""
    ) -> ThinkingBudget:
        """Ids from a :class:`qwen35.tokenizer.Tokenizer`: forces ``message + "</think>\\n\\n"``
        (``message`` e.g. a sentence telling the model to answer now; empty by default)."""
        end = tokenizer.encode("</think>\n\n")
        ids = (tokenizer.encode(message) if message else []) + end
        think_end = tokenizer.token_to_id("</think>")
        stops = {think_end}
        tool_call = tokenizer.token_to_id("<tool_call>")
        if tool_call is not None:
            stops.add(tool_call)
        return cls(
            budget_tokens,
            ids,
            thinking=thinking,
            think_start_id=tokenizer.token_to_id("<think>"),
            stop_ids=stops,
        )

    def _force(self) -> list[int]:
        self.done = True
        self.forced = True
        self.active = False
        return list(self.think_end_ids)

    def initial(self) -> list[int] | None:
        """Ids to force before the first generated token (only with a budget of 0 and an open think block)."""
        if self.active and not self.done and self.budget == 0:
            return self._force()
        return None

    def step(self, token_id: int) -> list[int] | None:
        """Account for one generated token; the ids to force right after it, or None."""
        if self.done:
            return None
        if not self.active:
            if self.think_start_id is not None and token_id == self.think_start_id:
                self.active = True
                if self.budget == 0:
                    return self._force()
            return None
        if token_id in self.stop_ids:
            self.done = True
            self.active = False
            return None
        if token_id == self.think_start_id:
            return None  # a repeated <think> is not reasoning
        self.reasoning_tokens += 1
        if self.budget is not None and self.reasoning_tokens >= self.budget:
            return self._force()
        return None
