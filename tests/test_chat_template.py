"""The built-in renderer is byte-identical to the official template rendered with jinja (ours, and
transformers' own renderer as an outside check), and invalid conversations raise the template's messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from qwen35.chat import ChatTemplateError, load_chat_template, normalize_messages, render

SHARED = Path(__file__).parents[2] / "shared"
OFFICIAL = SHARED / "reference" / "Qwen3.5-397B-A17B-FP8" / "chat_template.jinja"


@pytest.fixture(scope="module")
def official() -> str:
    if not OFFICIAL.is_file():
        pytest.skip("official chat template absent (../shared)")
    return OFFICIAL.read_text(encoding="utf-8")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather — météo, 天气",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer"},
                "units": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Web search",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "k": {"type": "number"}}},
    },
}
TOOLS = [WEATHER, SEARCH]


def call(name, args, wrap=True, cid="call_1"):
    if not wrap:
        return {"name": name, "arguments": args}
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


U = {"role": "user", "content": "What's the weather in Paris?"}
S = {"role": "system", "content": "You are a helpful assistant."}
MIXED_ARGS = {
    "city": "Paris",
    "days": 3,
    "ratio": 0.5,
    "flag": True,
    "none": None,
    "obj": {"a": [1, 2, {"b": "ü"}], "c": "d"},
    "arr": ["x", 1, None, False],
    "empty_list": [],
    "multiline": "line 1\nline 2\n",
}

# (id, messages, tools)
CONVERSATIONS = [
    ("user", [U], None),
    ("system_user", [S, U], None),
    (
        "system_list_content",
        [{"role": "system", "content": [{"type": "text", "text": "  Be terse.  "}]}, U],
        None,
    ),
    ("system_empty", [{"role": "system", "content": "   "}, U], None),
    ("user_whitespace_trim", [{"role": "user", "content": "\n\n  hi there \n"}], None),
    ("unicode", [{"role": "user", "content": "Привет 👋🏽 — 你好 \u00e9\u0301"}], None),
    (
        "multi_turn",
        [
            S,
            U,
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "And tomorrow?"},
        ],
        None,
    ),
    (
        "history_reasoning_dropped",
        [
            U,
            {"role": "assistant", "content": "Sunny.", "reasoning_content": "Think."},
            {"role": "user", "content": "Ok"},
        ],
        None,
    ),
    (
        "final_reasoning_kept",
        [U, {"role": "assistant", "content": "Sunny.", "reasoning_content": "  Think.\n"}],
        None,
    ),
    (
        "final_inline_think",
        [U, {"role": "assistant", "content": "<think>\nLet me see.\n</think>\n\nSunny."}],
        None,
    ),
    (
        "history_inline_think",
        [
            U,
            {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nSunny."},
            {"role": "user", "content": "Ok"},
        ],
        None,
    ),
    ("inline_close_only", [U, {"role": "assistant", "content": "reasoning here\n</think>\n\nanswer"}], None),
    (
        "reasoning_field_wins_over_inline",
        [U, {"role": "assistant", "content": "<think>x</think>y", "reasoning_content": ""}],
        None,
    ),
    ("reasoning_alias_thinking", [U, {"role": "assistant", "content": "A", "thinking": "via alias"}], None),
    ("assistant_none_content", [U, {"role": "assistant", "content": None}], None),
    ("tools_no_system", [U], TOOLS),
    ("tools_with_system", [S, U], TOOLS),
    ("tools_empty_system", [{"role": "system", "content": ""}, U], TOOLS),
    ("tools_bare_function_dicts", [U], [WEATHER["function"], SEARCH["function"]]),
    (
        "tool_call_string_arg",
        [S, U, {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]}],
        TOOLS,
    ),
    (
        "tool_call_mixed_args_dict",
        [U, {"role": "assistant", "content": "Checking.", "tool_calls": [call("get_weather", MIXED_ARGS)]}],
        TOOLS,
    ),
    (
        "tool_call_mixed_args_json_string",
        [
            U,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("get_weather", json.dumps(MIXED_ARGS))],
            },
        ],
        TOOLS,
    ),
    (
        "tool_call_unwrapped",
        [
            U,
            {
                "role": "assistant",
                "content": "x",
                "tool_calls": [call("search", {"q": "a b", "k": 5}, wrap=False)],
            },
        ],
        TOOLS,
    ),
    (
        "tool_call_no_arguments",
        [
            U,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "search"}}],
            },
        ],
        TOOLS,
    ),
    (
        "several_tool_calls",
        [
            U,
            {
                "role": "assistant",
                "content": "Two lookups.",
                "reasoning_content": "Need both.",
                "tool_calls": [
                    call("get_weather", {"city": "Paris", "days": 2}),
                    call("search", '{"q": "Paris events", "k": 1.5}', cid="call_2"),
                ],
            },
        ],
        TOOLS,
    ),
    (
        "tool_responses_consecutive",
        [
            U,
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 25C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "  Festival tonight  "},
        ],
        TOOLS,
    ),
    (
        "agent_multi_step",
        [
            S,
            U,
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "step 1",
                "tool_calls": [call("get_weather", {"city": "Paris"})],
            },
            {"role": "tool", "content": "Sunny"},
            {
                "role": "assistant",
                "content": "one more",
                "reasoning_content": "step 2",
                "tool_calls": [call("search", {"q": "uv index"})],
            },
            {"role": "tool", "content": "UV 7"},
            {"role": "assistant", "content": "Sunny, UV 7.", "reasoning_content": "done"},
        ],
        TOOLS,
    ),
    (
        "agent_then_new_user",
        [
            U,
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "r1",
                "tool_calls": [call("search", {"q": "x"})],
            },
            {"role": "tool", "content": "result"},
            {"role": "assistant", "content": "Answer.", "reasoning_content": "r2"},
            {"role": "user", "content": "Thanks, and Rome?"},
        ],
        TOOLS,
    ),
    (
        "user_tool_response_text_is_not_a_query",
        [
            U,
            {"role": "assistant", "content": "calling", "reasoning_content": "r"},
            {"role": "user", "content": "<tool_response>\nraw\n</tool_response>"},
        ],
        None,
    ),
    (
        "tool_after_system",
        [
            S,
            {"role": "user", "content": "q"},
            {"role": "tool", "content": "a"},
            {"role": "tool", "content": "b"},
        ],
        None,
    ),
    (
        "image_user",
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "What is it?"}],
            }
        ],
        None,
    ),
    (
        "image_url_and_video",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "http://x"}},
                    {"type": "text", "text": "and"},
                    {"type": "video", "video": "clip.mp4"},
                    {"type": "image"},
                ],
            }
        ],
        None,
    ),
    (
        "vision_over_turns",
        [
            S,
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "one"}]},
            {"role": "assistant", "content": "a cat"},
            {
                "role": "user",
                "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "two"}],
            },
        ],
        None,
    ),
    (
        "vision_in_tool_response",
        [
            U,
            {"role": "assistant", "content": "", "tool_calls": [call("search", {"q": "pic"})]},
            {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "found"}]},
        ],
        TOOLS,
    ),
    (
        "tools_system_list",
        [
            {
                "role": "system",
                "content": [{"type": "text", "text": "sys"}, {"type": "text", "text": " more"}],
            },
            U,
        ],
        TOOLS,
    ),
    (
        "final_assistant_with_tool_calls_and_think",
        [
            U,
            {
                "role": "assistant",
                "content": "<think>plan</think>Calling.",
                "tool_calls": [call("search", {"q": "z"})],
            },
        ],
        TOOLS,
    ),
    (
        "numbers_in_args",
        [U, {"role": "assistant", "content": "", "tool_calls": [call("search", {"k": 1e21})]}],
        TOOLS,
    ),
    (
        "assistant_list_content",
        [
            U,
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "part 1 "}, {"type": "text", "text": "part 2"}],
            },
        ],
        None,
    ),
    (
        "unicode_nested_args",
        [
            U,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("search", {"q": {"naïve": ["日本", "é"]}})],
            },
        ],
        TOOLS,
    ),
    ("whitespace_reasoning", [U, {"role": "assistant", "content": "ok", "reasoning_content": " \n "}], None),
    ("inline_think_twice_closed", [U, {"role": "assistant", "content": "<think>a</think>b</think>c"}], None),
    ("empty_user_content", [{"role": "user", "content": ""}], None),
    (
        "history_tool_calls_before_last_query",
        [
            U,
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "x",
                "tool_calls": [call("search", {"q": 1})],
            },
            {"role": "tool", "content": "r"},
            {"role": "assistant", "content": "done"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "next"}]},
        ],
        TOOLS,
    ),
]

KWARG_VARIANTS = [
    ("default", {}),
    ("think_on", {"enable_thinking": True}),
    ("think_off", {"enable_thinking": False}),
    ("vision_id", {"add_vision_id": True}),
    ("no_gen_prompt", {"add_generation_prompt": False}),
    ("no_gen_prompt_think_off", {"add_generation_prompt": False, "enable_thinking": False}),
]

CASES = [
    pytest.param(msgs, tools, kw, id=f"{cid}-{kid}")
    for cid, msgs, tools in CONVERSATIONS
    for kid, kw in KWARG_VARIANTS
]


def _render_both(official, msgs, tools, kw):
    kw = dict(kw)
    agp = kw.pop("add_generation_prompt", True)
    orig = copy.deepcopy(msgs)
    a = render(msgs, tools=tools, add_generation_prompt=agp, **kw)
    b = render(msgs, tools=tools, add_generation_prompt=agp, template=official, **kw)
    assert msgs == orig  # caller's messages untouched
    return a, b


def test_case_count():
    assert len(CONVERSATIONS) >= 40 and len(CASES) >= 6 * 40


@pytest.mark.parametrize("msgs,tools,kw", CASES)
def test_builtin_equals_official_template(official, msgs, tools, kw):
    a, b = _render_both(official, msgs, tools, kw)
    assert a == b


def test_matches_transformers_renderer(official):
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    for _, msgs, tools in CONVERSATIONS:
        for _, kw in KWARG_VARIANTS:
            kw = dict(kw)
            agp = kw.pop("add_generation_prompt", True)
            ours = render(msgs, tools=tools, add_generation_prompt=agp, **kw)
            theirs, _ = ctu.render_jinja_template(
                [normalize_messages(msgs)],
                tools=tools,
                chat_template=official,
                add_generation_prompt=agp,
                **kw,
            )
            assert ours == theirs[0]


def test_generation_prompt_forms():
    assert render([U]).endswith("<|im_start|>assistant\n<think>\n")
    assert render([U], enable_thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    assert render([U], enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert (
        render([U], add_generation_prompt=False)
        == "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"
    )


def test_tool_call_rendering_exact():
    msgs = [
        U,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("get_weather", {"city": "Paris", "days": 2})],
        },
    ]
    text = render(msgs, add_generation_prompt=False)
    assert text.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
    )


ERRORS = [
    ("empty", [], "No messages provided."),
    ("system_not_first", [U, S], "System message must be at the beginning."),
    (
        "image_in_system",
        [{"role": "system", "content": [{"type": "image"}]}, U],
        "System message cannot contain images.",
    ),
    (
        "video_in_system",
        [{"role": "system", "content": [{"type": "video"}]}, U],
        "System message cannot contain videos.",
    ),
    ("only_system", [S], "No user query found in messages."),
    ("only_assistant", [{"role": "assistant", "content": "hi"}], "No user query found in messages."),
    (
        "only_tool_response_user",
        [{"role": "user", "content": "<tool_response>x</tool_response>"}],
        "No user query found in messages.",
    ),
    ("unknown_role", [U, {"role": "narrator", "content": "x"}], "Unexpected message role."),
    ("missing_role", [U, {"content": "x"}], "Unexpected message role."),
    (
        "bad_item",
        [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}],
        "Unexpected item type in content.",
    ),
    ("bad_content_type", [{"role": "user", "content": {"text": "x"}}], "Unexpected content type."),
    ("int_content", [{"role": "user", "content": 5}], "Unexpected content type."),
]


@pytest.mark.parametrize("msgs,message", [pytest.param(m, e, id=i) for i, m, e in ERRORS])
@pytest.mark.parametrize("with_tools", [False, True])
def test_invalid_conversations(official, msgs, message, with_tools):
    tools = TOOLS if with_tools else None
    with pytest.raises(ChatTemplateError, match=message.replace(".", r"\.")) as e1:
        render(msgs, tools=tools)
    with pytest.raises(ChatTemplateError) as e2:
        render(msgs, tools=tools, template=official)
    assert str(e1.value) == str(e2.value) == message
    assert isinstance(e1.value, ValueError)


@pytest.mark.parametrize(
    "msgs",
    [
        [U, {"role": "assistant", "content": "", "tool_calls": [call("search", ["not", "a", "dict"])]}],
        [U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
        [{"role": "user", "content": [5]}],
    ],
)
def test_other_invalid_inputs_raise_value_errors(official, msgs):
    with pytest.raises(ChatTemplateError):
        render(msgs)
    with pytest.raises(ChatTemplateError):
        render(msgs, template=official)


def test_bad_arguments_json():
    msgs = [U, {"role": "assistant", "content": "", "tool_calls": [call("search", "{not json")]}]
    with pytest.raises(ValueError, match="not valid JSON"):
        render(msgs)


def _inverted(official: str) -> str:
    """The official template with the thinking default inverted, as the 0.8B and 2B checkpoints ship it."""
    old = "{%- if enable_thinking is defined and enable_thinking is false %}"
    assert old in official
    new = "{%- if not (enable_thinking is defined and enable_thinking is true) %}"
    return official.replace(old, new)


def test_checkpoint_template_is_followed(official, tmp_path):
    inverted = _inverted(official)
    # chat_template.jinja
    d1 = tmp_path / "a"
    d1.mkdir()
    (d1 / "chat_template.jinja").write_text(inverted)
    # tokenizer_config.json
    d2 = tmp_path / "b"
    d2.mkdir()
    (d2 / "tokenizer_config.json").write_text(json.dumps({"chat_template": inverted}))
    # a list of named templates
    d3 = tmp_path / "c"
    d3.mkdir()
    (d3 / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "x"},
                    {"name": "default", "template": inverted},
                ]
            }
        )
    )
    d4 = tmp_path / "d"  # nothing: built-in
    d4.mkdir()
    for d in (d1, d2, d3):
        t = load_chat_template(d)
        assert t == inverted
        assert render([U], template=t).endswith("assistant\n<think>\n\n</think>\n\n")
        assert render([U], template=t, enable_thinking=True).endswith("assistant\n<think>\n")
    assert load_chat_template(d4) is None
    assert load_chat_template(None) is None


def test_jinja_environment_behaves_like_transformers():
    t = (
        "{% for m in messages %}{{ m | tojson }}{% if loop.index > 0 %}{% break %}{% endif %}{% endfor %}\n"
        "  {% if x %}\n[{{ x|tojson(indent=1) }}]\n  {% endif %}"
        "{% generation %}G{% endgeneration %}{{ strftime_now('%Y') | length }}"
    )
    out = render([{"role": "user", "content": "é<b>&"}, {"role": "user", "content": "2"}], template=t, x=[1])
    assert out == '{"role": "user", "content": "é<b>&"}[[\n 1\n]]\nG4'
    with pytest.raises(ChatTemplateError, match="boom"):
        render([U], template="{{ raise_exception('boom') }}")
    with pytest.raises(ChatTemplateError):
        render([U], template="{{ ''.__class__.__mro__ }}")  # sandboxed
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render([U], template="{% if %}")
