"""Whole-text parsing of reasoning, content and XML tool calls."""

from __future__ import annotations

import json

import pytest

from qwen35.chat import ParsedOutput, parse, parse_tool_call_block, prompt_opens_thinking, render

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "ratio": {"type": "number"},
                    "metric": {"type": "boolean"},
                    "extra": {"type": "null"},
                    "opts": {"type": "object"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "maybe": {"type": ["integer", "null"]},
                    "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                    "choice": {"enum": [1, 2, 3]},
                    "nested": {"properties": {"a": {"type": "string"}}},
                },
            },
        },
    },
    # the bare function form is accepted too
    {
        "name": "search",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "k": {"type": "integer"}}},
    },
]


def ids(i: int) -> str:
    return f"call_{i}"


def tc(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def args_of(out: ParsedOutput, i: int = 0) -> dict:
    return json.loads(out.tool_calls[i]["function"]["arguments"])


# ---- reasoning


def test_thinking_reasoning_then_content():
    out = parse("Let me think.\nStep 2.\n</think>\n\nThe answer is 4.")
    assert out == ParsedOutput("Let me think.\nStep 2.", "The answer is 4.", [])


def test_unfinished_think_is_all_reasoning():
    out = parse("Hmm, the user wants <b>bold</b> and I think")
    assert out.reasoning_content == "Hmm, the user wants <b>bold</b> and I think"
    assert out.content is None and out.tool_calls == []


def test_thinking_false_is_all_content():
    out = parse("Just the answer.\n", thinking=False)
    assert out == ParsedOutput(None, "Just the answer.", [])


def test_thinking_false_but_model_opens_think():
    out = parse("\n<think>\nplan\n</think>\n\nanswer", thinking=False)
    assert out == ParsedOutput("plan", "answer", [])


def test_leading_think_tag_is_dropped_when_prompt_opened_it():
    assert parse("<think>\nx\n</think>\n\ny") == ParsedOutput("x", "y", [])


def test_empty_reasoning_is_none():
    # enable_thinking=False prompts already hold "<think>\n\n</think>\n\n"; a thinking prompt may get an empty
    # block
    assert parse("\n</think>\n\nHi") == ParsedOutput(None, "Hi", [])
    assert parse("") == ParsedOutput(None, None, [])
    assert parse("", thinking=False) == ParsedOutput(None, None, [])


def test_stray_think_tags_never_in_output():
    out = parse("a<think>b</think>c</think>d<think>e", thinking=True)
    assert out == ParsedOutput("ab", "cde", [])
    out = parse("x</think>y", thinking=False)
    assert out == ParsedOutput(None, "xy", [])


def test_partial_tags_are_text():
    out = parse("a < b and <thin", thinking=True)
    assert out.reasoning_content == "a < b and <thin"
    out = parse("r</think>x </tool_call> <tool_cal", thinking=True)
    assert out.content == "x </tool_call> <tool_cal"


def test_prompt_opens_thinking():
    user = [{"role": "user", "content": "hi"}]
    assert prompt_opens_thinking(render(user))
    assert not prompt_opens_thinking(render(user, enable_thinking=False))
    assert not prompt_opens_thinking("<|im_start|>assistant\n")


# ---- tool calls


def test_tool_call_after_content_typed_by_schema():
    text = "The user asks about weather.\n</think>\n\nLet me check.\n\n" + tc(
        "get_weather",
        city="Paris",
        days="3",
        ratio="0.25",
        metric="true",
        extra="null",
        opts='{"a": [1, 2], "b": "ü"}',
        tags='["x", "y"]',
        maybe="null",
        either="7",
        choice="2",
        nested='{"a": "b"}',
    )
    out = parse(text, TOOLS, tool_call_id=ids)
    assert out.reasoning_content == "The user asks about weather."
    assert out.content == "Let me check."
    assert out.tool_calls == [
        {
            "id": "call_0",
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": json.dumps(
                    {
                        "city": "Paris",
                        "days": 3,
                        "ratio": 0.25,
                        "metric": True,
                        "extra": None,
                        "opts": {"a": [1, 2], "b": "ü"},
                        "tags": ["x", "y"],
                        "maybe": None,
                        "either": "7",  # a string is allowed: raw text
                        "choice": 2,
                        "nested": {"a": "b"},
                    },
                    ensure_ascii=False,
                ),
            },
        }
    ]


def test_tool_call_inside_think_is_real_and_ends_reasoning():
    # the peers lose these (vllm#39056) or call them reasoning (sglang#25242)
    text = "I should look it up.\n" + tc("search", q="qwen", k="3")
    out = parse(text, TOOLS, tool_call_id=ids)
    assert out.reasoning_content == "I should look it up."
    assert out.content is None
    assert out.tool_calls[0]["function"]["name"] == "search"
    assert args_of(out) == {"q": "qwen", "k": 3}
    # and a </think> written after the call is dropped, text after it is content
    out = parse(text + "\n</think>\n\nDone.", TOOLS)
    assert (
        out.reasoning_content == "I should look it up."
        and out.content == "Done."
        and len(out.tool_calls) == 1
    )


def test_tool_call_with_thinking_false():
    out = parse(tc("search", q="a"), TOOLS, thinking=False)
    assert out.reasoning_content is None and out.content is None and args_of(out) == {"q": "a"}


def test_several_calls():
    text = (
        "r</think>\n\n"
        + tc("search", q="a")
        + "\n"
        + tc("get_weather", city="Rome")
        + "\n"
        + tc("search", q="b")
    )
    out = parse(text, TOOLS, tool_call_id=ids)
    assert [c["function"]["name"] for c in out.tool_calls] == ["search", "get_weather", "search"]
    assert [c["id"] for c in out.tool_calls] == ["call_0", "call_1", "call_2"]
    assert out.content is None


def test_default_ids_unique():
    out = parse(tc("search", q="a") + tc("search", q="b"), TOOLS)
    a, b = (c["id"] for c in out.tool_calls)
    assert a != b and a.startswith("call_") and len(a) == 29


def test_string_values_keep_inner_newlines_and_lose_one_each_side():
    text = (
        "<tool_call>\n<function=search>\n<parameter=q>\n\n  two\nlines  \n\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    assert args_of(parse(text, TOOLS)) == {"q": "\n  two\nlines  \n"}
    # no newlines at all is fine too
    text = "<tool_call><function=search><parameter=q>x</parameter></function></tool_call>"
    assert args_of(parse(text, TOOLS)) == {"q": "x"}


def test_values_that_do_not_parse_stay_raw():
    out = parse(
        tc(
            "get_weather", days="three", ratio="NaN", metric="yes", opts="{bad json", tags='{"not": "a list"}'
        ),
        TOOLS,
    )
    assert args_of(out) == {
        "days": "three",
        "ratio": "NaN",
        "metric": "yes",
        "opts": "{bad json",
        "tags": '{"not": "a list"}',
    }


def test_number_and_integer_forms():
    out = parse(tc("get_weather", days="-12", ratio="1e3", maybe="4.0", choice="2.5"), TOOLS)
    a = args_of(out)
    assert a == {"days": -12, "ratio": 1000.0, "maybe": 4, "choice": "2.5"}  # enum of integers
    assert isinstance(a["ratio"], float)


def test_unknown_parameter_and_no_tools_give_strings():
    out = parse(tc("get_weather", city="X", unknown="5"), TOOLS)
    assert args_of(out) == {"city": "X", "unknown": "5"}
    out = parse(tc("anything", n="5"))  # no tools: names not checked, values strings
    assert out.tool_calls[0]["function"]["name"] == "anything" and args_of(out) == {"n": "5"}
    assert parse(tc("anything"), []).tool_calls[0]["function"]["arguments"] == "{}"


def test_unknown_function_is_content():
    text = "r</think>\n\nCalling.\n" + tc("delete_everything", path="/") + "\n" + tc("search", q="ok")
    out = parse(text, TOOLS)
    assert out.content == "Calling.\n" + tc("delete_everything", path="/")
    assert [c["function"]["name"] for c in out.tool_calls] == ["search"]


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\n<function=search>\n<parameter=q>\nx\n</parameter>\n</tool_call>",  # no </function>
        "<tool_call>\nsearch(q='x')\n</tool_call>",  # not XML
        "<tool_call>\n<function=>\n</function>\n</tool_call>",  # empty name
        "<tool_call>\n<function=search>\njunk\n<parameter=q>\nx\n</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n<function=search>\n</function>\n<function=search>\n</function>\n</tool_call>",
        '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>',  # JSON (Qwen3 format)
        "<tool_call>\n<function=search>\n<parameter=>\nx\n</parameter>\n</function>\n</tool_call>",
    ],
)
def test_malformed_calls_are_content(bad):
    out = parse("r</think>\n\nText.\n" + bad, TOOLS)
    assert out.tool_calls == []
    assert out.content == "Text.\n" + bad


def test_missing_last_parameter_close_is_tolerated():
    text = (
        "<tool_call>\n<function=search>\n<parameter=q>\nabc\n</parameter>\n<parameter=k>\n5\n"
        "</function>\n</tool_call>"
    )
    assert args_of(parse(text, TOOLS)) == {"q": "abc", "k": 5}


def test_truncated_call_is_content():
    for cut in (
        "<tool_call>",
        "<tool_call>\n<function=sea",
        "<tool_call>\n<function=search>\n<parameter=q>\nab",
    ):
        out = parse("r</think>\n\nLet me search. " + cut, TOOLS)
        assert out.tool_calls == [] and out.content == "Let me search. " + cut
    # truncated inside the think block: reasoning ends, the partial call is content
    out = parse("thinking " + "<tool_call>\n<function=search>", TOOLS)
    assert out.reasoning_content == "thinking" and out.content == "<tool_call>\n<function=search>"


def test_call_interrupted_by_new_call_or_think_tag():
    first = "<tool_call>\n<function=search>\n<parameter=q>\nab"
    out = parse("r</think>" + first + tc("search", q="c"), TOOLS, tool_call_id=ids)
    assert out.content == first and args_of(out) == {"q": "c"} and out.tool_calls[0]["id"] == "call_0"
    out = parse("plan " + first + "\n</think>\n\nanswer", TOOLS)
    assert out == ParsedOutput("plan", first + "\n\n\nanswer", [])


def test_text_between_and_after_calls():
    text = "pre\n" + tc("search", q="1") + "\n\n  \n" + tc("search", q="2") + "\nAnd more text.\n"
    out = parse(text, TOOLS, thinking=False)
    assert out.content == "pre\n\nAnd more text."
    assert len(out.tool_calls) == 2


def test_stray_close_tag_is_text():
    out = parse("x</tool_call>y", thinking=False)
    assert out.content == "x</tool_call>y"


def test_round_trip_through_template():
    text = "Need data.\n</think>\n\nChecking.\n\n" + tc("get_weather", city="Paris", days="2")
    out = parse(text, TOOLS)
    msgs = [{"role": "user", "content": "weather?"}, out.to_message()]
    rendered = render(msgs, tools=TOOLS, add_generation_prompt=False)
    prompt = render(msgs[:1], tools=TOOLS)
    # the history reproduces exactly what the model generated after the prompt
    assert rendered == prompt + text + "<|im_end|>\n"


def test_parse_tool_call_block_direct():
    assert parse_tool_call_block(tc("f", a="1"), None) == ("f", {"a": "1"})
    assert parse_tool_call_block("<tool_call>x", None) is None
    assert parse_tool_call_block(tc("f", a="1"), {"g": {}}) is None
