"""Thinking budget controller: forces ``</think>\\n\\n`` once a request's reasoning reaches N tokens."""

from __future__ import annotations

import pytest

from qwen35.chat import StreamParser, ThinkingBudget, parse

END = [248069, 271]  # "</think>" "\n\n"
THINK, THINK_END, TOOL_CALL = 248068, 248069, 248058


def run(budget: ThinkingBudget, generated: list[int]) -> list[int]:
    """Simulate the engine: sampled tokens in, output with forced tokens spliced in."""
    out = list(budget.initial() or [])
    for t in generated:
        out.append(t)
        forced = budget.step(t)
        if forced:
            out += forced
            for f in forced:  # the engine may feed forced tokens back: harmless
                assert budget.step(f) is None
    return out


def test_forces_end_after_n_reasoning_tokens():
    b = ThinkingBudget(3, END)
    assert b.step(10) is None and b.step(11) is None
    assert b.step(12) == END
    assert b.forced and b.done and b.reasoning_tokens == 3
    assert b.step(13) is None  # answer tokens: never again


def test_model_closing_in_time_is_not_touched():
    b = ThinkingBudget(5, END)
    assert run(b, [1, 2, THINK_END, 271, 7, 8, 9, 10]) == [1, 2, THINK_END, 271, 7, 8, 9, 10]
    assert b.done and not b.forced and b.reasoning_tokens == 2


def test_budget_exactly_reached_by_close_tag():
    b = ThinkingBudget(2, END)
    assert run(b, [1, THINK_END, 5]) == [1, THINK_END, 5]
    assert not b.forced


def test_tool_call_ends_reasoning():
    b = ThinkingBudget(3, END)
    assert run(b, [1, 2, TOOL_CALL, 4, 5, 6, 7]) == [1, 2, TOOL_CALL, 4, 5, 6, 7]
    assert not b.forced


def test_zero_budget_forces_before_first_token():
    b = ThinkingBudget(0, END)
    assert run(b, [5, 6]) == END + [5, 6]
    assert b.forced


def test_unlimited():
    for budget in (None, -1):
        b = ThinkingBudget(budget, END)
        assert run(b, list(range(1000))) == list(range(1000))
        assert not b.forced and b.reasoning_tokens == 1000


def test_thinking_off_counts_only_after_model_opens_think():
    b = ThinkingBudget(2, END, thinking=False)
    assert run(b, [1, 2, 3, 4]) == [1, 2, 3, 4]
    b = ThinkingBudget(2, END, thinking=False)
    assert run(b, [1, THINK, 2, 3, 4]) == [1, THINK, 2, 3] + END + [4]
    b = ThinkingBudget(0, END, thinking=False)
    assert run(b, [THINK, 9]) == [THINK] + END + [9]


def test_repeated_open_tag_is_not_counted():
    b = ThinkingBudget(2, END)
    assert run(b, [THINK, 1, 2, 3]) == [THINK, 1, 2] + END + [3]


def test_validation():
    with pytest.raises(ValueError):
        ThinkingBudget(3, [])


def test_with_tokenizer_and_parser():
    from qwen35.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    b = ThinkingBudget.for_tokenizer(tok, 4)
    assert b.think_end_ids == tok.encode("</think>\n\n") == END
    reasoning = tok.encode(" one two three four five six")
    answer = tok.encode("The answer.")
    out = run(b, reasoning[:4]) + answer  # the engine samples the answer after the forced end
    text = tok.decode(out)
    assert text == " one two three four</think>\n\nThe answer."
    got = parse(text)
    assert got.reasoning_content == "one two three four" and got.content == "The answer."
    # streaming the same ids through the parser
    p = StreamParser()
    det = tok.detokenizer()
    deltas = []
    for i in out:
        deltas += p.feed(det.add(i))
    deltas += p.finish()
    assert "".join(d.get("content", "") for d in deltas) == "The answer."
    # a message before the tag
    b = ThinkingBudget.for_tokenizer(tok, 1, message="\n\nTime is up.\n")
    assert tok.decode(b.think_end_ids) == "\n\nTime is up.\n</think>\n\n"
    assert b.stop_ids == {THINK_END, TOOL_CALL}
    assert run(b, [100, 101]) == [100] + b.think_end_ids + [101]
