"""Streaming parser: however the output is cut, the deltas add up to the whole-text parse, and no tag text
leaks into reasoning or content."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen35.chat import ParsedOutput, StreamParser, parse, parse_tool_call_block

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
                    "opts": {"type": "object"},
                    "flag": {"type": "boolean"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "search", "parameters": {"properties": {"q": {"type": "string"}}}},
    },
]


def ids(i: int) -> str:
    return f"call_{i}"


def stream(text: str, cuts, tools=TOOLS, thinking=True):
    """Feed ``text`` cut at ``cuts``; return (deltas, accumulated result)."""
    p = StreamParser(tools, thinking, tool_call_id=ids)
    deltas = []
    prev = 0
    for c in sorted(set(cuts)) + [len(text)]:
        deltas += p.feed(text[prev:c])
        prev = c
    deltas += p.finish()
    return deltas, ParsedOutput.from_deltas(deltas)


def tc(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


EXAMPLES = [
    "Let me think.\n</think>\n\nThe answer is 4.",
    "unfinished reasoning with < and <th and </",
    "<think>\nx\n</think>\n\ny",
    "I will call.\n" + tc("search", q="qwen") + "\n</think>\n\nDone.",
    "r</think>\n\nChecking.\n\n"
    + tc("get_weather", city="Paris", days="3", opts='{"a": 1}')
    + "\n"
    + tc("search", q="b"),
    "r</think>\n\nSure.\n" + tc("nope", x="1") + "\n" + tc("search", q="c") + "\ntrailing",
    "r</think>\n\n<tool_call>\n<function=search>\n<parameter=q>\ntrunc",
    "r</think>" + "<tool_call>\n<function=search>" + tc("search", q="d"),
    "a<think>b</think>c</think>d<think>e",
    "x</tool_call>y<tool_call",
    "   \n  ",
    "",
]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("text", EXAMPLES)
def test_one_character_at_a_time(text, thinking):
    whole = parse(text, TOOLS, thinking, tool_call_id=ids)
    deltas, got = stream(text, range(len(text)), thinking=thinking)
    assert got == whole
    _, got1 = stream(text, [], thinking=thinking)  # one piece
    assert got1 == whole


def test_many_tags_in_one_delta():
    # several tags and a whole call in one delta (vllm PR#35421)
    text = "plan</think>\n\nok" + tc("search", q="1") + tc("search", q="2") + "<think>x</think>end"
    deltas, got = stream(text, [2])
    assert got == parse(text, TOOLS, tool_call_id=ids)
    assert got.content == "okxend" and len(got.tool_calls) == 2


def test_delta_shapes():
    text = "plan</think>\n\nHello" + tc("get_weather", city="Rome", flag="false")
    p = StreamParser(TOOLS, tool_call_id=ids)
    assert p.feed("pl") == [{"reasoning_content": "pl"}]
    assert p.in_reasoning
    assert p.feed("an</thi") == [{"reasoning_content": "an"}]  # "</thi" held back
    assert p.feed("nk>\n\nHel") == [{"content": "Hel"}]
    assert not p.in_reasoning
    rest = text[len("plan</think>\n\nHel") :]
    out = p.feed(rest)
    assert out == [
        {"content": "lo"},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome", "flag": false}'},
                }
            ]
        },
    ]
    assert p.finish() == [] and p.num_tool_calls == 1
    assert p.text == text
    with pytest.raises(RuntimeError):
        p.feed("x")


def test_trailing_whitespace_is_held_not_lost():
    p = StreamParser(thinking=False)
    assert p.feed("a \n") == [{"content": "a"}]
    assert p.feed("b") == [{"content": " \nb"}]
    assert p.feed("\n\n") == []
    assert p.finish() == []


def test_per_token_with_real_tokenizer():
    from qwen35.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    text = (
        "The user wants weather in 東京 🌸.\n"
        + tc("get_weather", city="東京", days="2")
        + "\n</think>\n\nLet me also search.\n\n"
        + tc("search", q="桜 forecast")
    )
    ids_ = tok.encode(text)
    assert tok.token_to_id("<tool_call>") in ids_
    det = tok.detokenizer()
    p = StreamParser(TOOLS, tool_call_id=ids)
    deltas = []
    for i in ids_:
        deltas += p.feed(det.add(i))
    deltas += p.feed(det.finish()) + p.finish()
    assert ParsedOutput.from_deltas(deltas) == parse(text, TOOLS, tool_call_id=ids)
    got = ParsedOutput.from_deltas(deltas)
    assert got.reasoning_content == "The user wants weather in 東京 🌸."
    assert json.loads(got.tool_calls[1]["function"]["arguments"]) == {"q": "桜 forecast"}


# ---- property tests

WORDS = ["hello", "the answer", "東京", "🌸", "x", "42", "a < b", "<b>", "if x<3:", "{}", "\\n"]
WS = [" ", "\n", "\n\n", "\t", "  \n "]
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
PARTIALS = [
    "<",
    "</",
    "<th",
    "<think",
    "</thi",
    "<tool",
    "<tool_call",
    "</tool_cal",
    ">",
    "<function=",
    "</function>",
]
PARAM_VALUES = ["Paris", "3", "-1", "true", "null", '{"a": [1, 2]}', "[1]", "multi\nline", "", " spaced "]


@st.composite
def tool_call_text(draw):
    name = draw(st.sampled_from(["get_weather", "search", "unknown_fn"]))
    keys = draw(
        st.lists(st.sampled_from(["city", "days", "opts", "flag", "q", "zz"]), max_size=3, unique=True)
    )
    params = {k: draw(st.sampled_from(PARAM_VALUES)) for k in keys}
    text = tc(name, **params)
    mutation = draw(st.sampled_from(["none", "none", "none", "truncate", "drop_function_close", "compact"]))
    if mutation == "truncate":
        text = text[: draw(st.integers(1, len(text) - 1))]
    elif mutation == "drop_function_close":
        text = text.replace("</function>\n", "")
    elif mutation == "compact":
        text = text.replace("\n", "")
    return text


realistic_piece = st.one_of(
    st.sampled_from(WORDS), st.sampled_from(WS), st.sampled_from(TAGS[:2]), tool_call_text()
)
adversarial_piece = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from(WS),
    st.sampled_from(TAGS),
    st.sampled_from(PARTIALS),
    tool_call_text(),
    st.text(alphabet="<>/=_ \nthinkol", max_size=6),
)


def _cuts(draw, text):
    n = len(text)
    if n == 0:
        return []
    return draw(st.lists(st.integers(0, n), max_size=min(n, 40)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_equals_whole_parse_adversarial(data):
    pieces = data.draw(st.lists(adversarial_piece, max_size=14))
    text = "".join(pieces)
    thinking = data.draw(st.booleans())
    tools = data.draw(st.sampled_from([TOOLS, None]))
    cuts = _cuts(data.draw, text)
    whole = parse(text, tools, thinking, tool_call_id=ids)
    _, got = stream(text, cuts, tools=tools, thinking=thinking)
    assert got == whole


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_realistic_no_tag_leaks(data):
    pieces = data.draw(st.lists(realistic_piece, max_size=12))
    text = "".join(pieces)
    thinking = data.draw(st.booleans())
    cuts = _cuts(data.draw, text)
    whole = parse(text, TOOLS, thinking, tool_call_id=ids)
    deltas, got = stream(text, cuts, thinking=thinking)
    assert got == whole
    for d in deltas:
        assert len(d) == 1
        for key in ("reasoning_content", "content"):
            if key in d:
                assert d[key]
                assert "<think>" not in d[key] and "</think>" not in d[key]
    # reasoning never holds tool-call markup; content only holds it for calls that were not valid
    assert "<tool_call>" not in (whole.reasoning_content or "")
    if whole.content and "<tool_call>" in whole.content:
        assert text.count("<tool_call>") > len(whole.tool_calls)
    for c in whole.tool_calls:
        json.loads(c["function"]["arguments"])
    # no tool call is lost: every valid call written is returned, in order
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    valid = [b for b in (parse_tool_call_block(p, schemas) for p in pieces) if b is not None]
    assert [c["function"]["name"] for c in whole.tool_calls] == [name for name, _ in valid]
    assert [json.loads(c["function"]["arguments"]) for c in whole.tool_calls] == [a for _, a in valid]
