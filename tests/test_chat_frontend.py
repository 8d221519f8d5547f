"""The one chat front end (qwen35.chat.frontend): planning (tool choice, thinking, folded system messages) and
reading answers back, whole and streamed, the same way."""

from __future__ import annotations

import json
import random

import pytest
from test_engine_support import make_model, write_config

import qwen35
from qwen35.chat import render
from qwen35.chat.frontend import (
    NO_TOOLS,
    ChatRequest,
    ChatRequestError,
    ChoiceReader,
    fold_system_messages,
    plan_chat,
    read_choice,
)
from qwen35.chat.parser import ParsedOutput
from qwen35.tokenizer import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """The real vocabulary (for the chat template's tokens), tiny everything else."""
    folder = write_config(tmp_path_factory.mktemp("frontend") / "m", vocab_size=248320)
    return qwen35.LLM(make_model(folder), tokenizer=load_tokenizer(None), kv_cache_memory_bytes=1 << 22)


def test_fold_system_messages():
    msgs = [{"role": "system", "content": "A"}, {"role": "user", "content": "u1"},
            {"role": "system", "content": [{"type": "text", "text": "B"}]}, {"role": "assistant", "content": "a"},
            {"role": "system", "content": "C"}, {"role": "user", "content": "u2"}]
    out = fold_system_messages(msgs)
    assert out[0] == {"role": "system", "content": "A\n\nB\n\nC"}
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    # no system message at the start: one is made
    out = fold_system_messages([{"role": "user", "content": "u"}, {"role": "system", "content": "S"}])
    assert out == [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    # and the template renders what it would refuse otherwise
    plan = plan_chat(ChatRequest(msgs))
    assert plan.prompt.startswith("<|im_start|>system\nA\n\nB\n\nC<|im_end|>")
    with pytest.raises(ValueError, match="System message"):
        render(msgs)


def test_tool_choice_plans(tok):
    auto = plan_chat(ChatRequest(USER, tools=TOOLS), tok)
    assert auto.forced_call is None and auto.thinking and not auto.extra_stop_ids
    assert "get_weather" in auto.prompt and auto.parser_tools[0]["function"]["name"] == "get_weather"
    none = plan_chat(ChatRequest(USER, tools=TOOLS, tool_choice="none"), tok)
    assert "get_weather" not in none.prompt and none.parser_tools is NO_TOOLS
    req = plan_chat(ChatRequest(USER, tools=TOOLS, tool_choice="required"), tok)
    assert req.prompt.endswith("</think>\n\n") and not req.thinking  # no reasoning before a forced call
    assert req.forced_call == {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": True}
    assert not req.extra_stop_ids  # the grammar ends the answer
    named = plan_chat(ChatRequest(USER, tools=TOOLS, tool_choice={"type": "function",
                                                                   "function": {"name": "get_weather"}}), tok)
    assert named.forced_call["tool_choice"] == "get_weather" and not named.forced_call["parallel_tool_calls"]
    single = plan_chat(ChatRequest(USER, tools=TOOLS, parallel_tool_calls=False), tok)
    assert single.extra_stop_ids == (tok.token_to_id("</tool_call>"),) and single.forced_call is None
    off = plan_chat(ChatRequest(USER, enable_thinking=False), tok)
    assert not off.thinking and off.prompt.endswith("<think>\n\n</think>\n\n")
    for bad in ({"type": "function", "function": {"name": "nope"}}, "sometimes"):
        with pytest.raises(ChatRequestError) as e:
            plan_chat(ChatRequest(USER, tools=TOOLS, tool_choice=bad), tok)
        assert e.value.param == "tool_choice"
    with pytest.raises(ChatRequestError, match="needs tools"):
        plan_chat(ChatRequest(USER, tool_choice="required"), tok)
    with pytest.raises(ChatRequestError) as e:
        plan_chat(ChatRequest([{"role": "assistant", "content": "x"}, {"role": "wizard", "content": "y"}]), tok)
    assert e.value.code == "invalid_chat"


@pytest.mark.parametrize("seed", range(6))
def test_whole_and_streamed_reading_agree(tok, seed):
    """However the text is cut, the streamed reader's deltas add up to the whole reading, with the
    `</tool_call>` stop put back."""
    rng = random.Random(seed)
    single = plan_chat(ChatRequest(USER, tools=TOOLS, parallel_tool_calls=False), tok)
    auto = plan_chat(ChatRequest(USER, tools=TOOLS), tok)
    close = tok.token_to_id("</tool_call>")
    cases = [
        (single, "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
                 "</parameter>\n</function>\n", close),
        (auto, "Let me look.\n</think>\n\nSure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n"
               "</parameter>\n</function>\n</tool_call>", None),
        (auto, "hmm</think>\n\nIt is sunny.", None),
    ]
    for plan, text, stop in cases:
        whole, finish, stop_out = read_choice(plan, text, "stop", stop)
        reader = ChoiceReader(plan)
        deltas, i = [], 0
        while i < len(text):
            j = i + rng.randint(1, 7)
            deltas += reader.feed(text[i:j])
            i = j
        last, finish2, stop2 = reader.finish("stop", stop)
        streamed = ParsedOutput.from_deltas(deltas + last)
        assert (streamed.reasoning_content, streamed.content) == (whole.reasoning_content, whole.content)
        assert [c["function"] for c in streamed.tool_calls] == [c["function"] for c in whole.tool_calls]
        assert (finish, stop_out) == (finish2, stop2)
    first = read_choice(*cases[0][:2], "stop", close)
    assert first[1] == "tool_calls" and first[2] is None  # the added stop is not the client's stop reason
    assert first[0].tool_calls[0]["function"]["arguments"] == '{"city": "Paris", "days": 3}'
    assert read_choice(*cases[2][:2], "stop")[0].reasoning_content == "hmm"
    # cut by max_tokens inside the call: content, not a call
    cut = read_choice(single, "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", "length")
    assert cut[1] == "length" and not cut[0].tool_calls


def test_llm_chat_tool_choice(tiny_llm):
    """LLM.chat plans with the same front end: a forced tool choice constrains even random weights to valid
    calls of the named (or any) tool."""
    import jsonschema_rs

    from qwen35 import SamplingParams

    # bounded strings: a random model never ends a free string by itself (a call cut by max_tokens is no call)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
        "required": ["city"]}}}]
    validator = jsonschema_rs.validator_for(tools[0]["function"]["parameters"])
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        outs = tiny_llm.chat(USER, SamplingParams(max_tokens=200, temperature=1.0, seed=3), tools=tools,
                             tool_choice=choice, use_tqdm=False)
        c = outs[0].outputs[0]
        assert outs[0].prompt.endswith("</think>\n\n")
        assert c.finish_reason == "tool_calls", c.text
        for call in c.tool_calls:
            assert call["function"]["name"] == "get_weather"
            validator.validate(json.loads(call["function"]["arguments"]))
