"""Structured output (qwen35.engine.structured): every kind of constraint on a tiny random model with the real
vocabulary, greedy and sampled, batched with free rows, n > 1, thinking then grammar, tool calls, the masked head
screen against the full logits, malformed specs, seeded reproducibility, MTP, and the completions route.

With random weights the model follows nothing but the mask, so every output is what the grammar alone allows:
the schemas bound their strings and numbers so that outputs end by themselves within max_tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema_rs
import openai
import pytest
import torch
from test_engine_support import make_model, random_prompts, write_config
from test_server_support import VOCAB, ServerThread, call

import qwen35
from qwen35 import SamplingParams, StructuredOutputsParams
from qwen35.chat import parse
from qwen35.engine.structured import GrammarCompiler, structured_from_response_format, tool_call_grammar
from qwen35.model.cache import CacheLayout
from qwen35.ops import cpu_kernels
from qwen35.ops.head_screen import HeadScreen
from qwen35.server import ServerConfig

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2},
    "kind": {"enum": ["x", "y", None]}},
    "required": ["name", "age", "ok", "kind"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "options": {"type": "object", "properties": {"hourly": {"type": "boolean"}}, "required": ["hourly"],
                "additionalProperties": False}},
    "required": ["city", "days"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
TOOLS = [WEATHER, CLOCK]
PROMPTS = ["Hello", "Give me JSON about a person", "1 2 3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("structured") / "tiny", vocab_size=VOCAB, mtp_num_hidden_layers=1)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return qwen35.load_tokenizer(folder)


@pytest.fixture(scope="module")
def llm(folder, tokenizer):
    return qwen35.LLM(make_model(folder), tokenizer=tokenizer, kv_cache_memory_bytes=1 << 25, max_model_len=1024)


def so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def greedy(spec, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=kw.pop("max_tokens", 60), structured_outputs=spec, **kw)


def sampled(spec, seed, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=kw.pop("max_tokens", 60), structured_outputs=spec,
                          **kw)


def texts(outs):
    return [c.text for o in outs for c in o.outputs]


def assert_valid_json(text, schema=SCHEMA):
    value = json.loads(text)
    assert jsonschema_rs.validator_for(schema).is_valid(value), (text, schema)
    return value


# ------------------------------------------------------------------------------------------ every kind
def test_json_schema_greedy_and_sampled_batched_with_free_rows(llm):
    spec = so(json=SCHEMA)
    free = SamplingParams(temperature=0, max_tokens=8)
    params = [greedy(spec), sampled(spec, 1), free, sampled(spec, 2), SamplingParams(temperature=1, seed=3,
                                                                                     max_tokens=8)]
    outs = llm.generate(PROMPTS + PROMPTS[:2], params, use_tqdm=False)
    for i in (0, 1, 3):
        c = outs[i].outputs[0]
        assert c.finish_reason == "stop", (c.text, c.finish_reason)
        assert_valid_json(c.text)
    # the free rows are not constrained: what they give alone
    alone = llm.generate([PROMPTS[2], PROMPTS[1]], [free, params[4]], use_tqdm=False)
    assert [outs[2].outputs[0].token_ids, outs[4].outputs[0].token_ids] == [a.outputs[0].token_ids for a in alone]
    # the schema also as JSON text, and json_object
    c = llm.generate(["x"], greedy(so(json=json.dumps(SCHEMA))), use_tqdm=False)[0].outputs[0]
    assert_valid_json(c.text)


def test_json_object_output_is_an_object_or_its_prefix(llm, tokenizer):
    spec = so(json_object=True)
    compiler = GrammarCompiler.for_tokenizer(tokenizer, llm.engine.vocab_size, llm.engine.eos_token_ids)
    outs = llm.generate(PROMPTS, [sampled(spec, s, max_tokens=24) for s in range(3)], use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:  # a random model rarely closes a free string: then every token it wrote is one the grammar allows
            state = compiler.new_state(spec)
            for t in c.token_ids:
                assert state.allowed()[t]
                state.advance(t)
            assert c.text.startswith("{") and state.failed is None


def test_regex_choice_lark_and_gbnf(llm):
    cases = [
        (so(regex=r"[0-9]{3}-[a-c]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-c]{2,4}", t)),
        (so(choice=["red", "green", "light blue"]), lambda t: t in ("red", "green", "light blue")),
        (so(grammar='start: "ok " NUM ("," NUM){0,2}\nNUM: /[1-9][0-9]?/\n'),
         lambda t: re.fullmatch(r"ok [1-9][0-9]?(,[1-9][0-9]?){0,2}", t)),
        (so(grammar='root ::= "yes" | "no" | digit digit\ndigit ::= [0-9]\n'),  # GBNF, as llama.cpp writes it
         lambda t: re.fullmatch(r"yes|no|[0-9]{2}", t)),
    ]
    params = [p for spec, _ in cases for p in (greedy(spec, max_tokens=20), sampled(spec, 5, max_tokens=20))]
    outs = llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    for k, (_, ok) in enumerate(cases):
        for c in (outs[2 * k].outputs[0], outs[2 * k + 1].outputs[0]):
            assert c.finish_reason == "stop" and ok(c.text), (k, c.text)


def test_n_choices_each_follow_their_own_matcher_and_seeds_reproduce(llm):
    spec = so(json=SCHEMA)
    params = sampled(spec, 11, n=3)
    alone = llm.generate(["Person:"], params, use_tqdm=False)[0]
    values = [assert_valid_json(c.text) for c in alone.outputs]
    assert len({json.dumps(v) for v in values}) > 1  # three matchers, three different walks
    # the same seed in a batch with other rows (free and constrained) gives the same tokens
    mixed = llm.generate(["Hi", "Person:", "1 2"], [SamplingParams(temperature=0.8, seed=1, max_tokens=10), params,
                                                    sampled(so(choice=["a", "b"]), 4)], use_tqdm=False)
    assert [c.token_ids for c in mixed[1].outputs] == [c.token_ids for c in alone.outputs]


def test_logprobs_are_those_of_the_masked_distribution(llm):
    spec = so(choice=["yes", "no"])
    c = llm.generate(["Q:"], greedy(spec, logprobs=5), use_tqdm=False)[0].outputs[0]
    first = c.logprobs[0]
    # only the grammar's first tokens are alternatives, and their probabilities sum to one
    allowed = {t for t in first if first[t].rank is not None}
    assert allowed and all(llm.get_tokenizer().decode([t]) in ("y", "ye", "yes", "n", "no") for t in allowed)
    assert abs(sum(torch.tensor([first[t].logprob for t in allowed]).exp().tolist()) - 1) < 1e-4
    assert first[c.token_ids[0]].rank == 1


# ------------------------------------------------------------------------------------------ thinking
def test_reasoning_runs_free_then_the_grammar_after_think_close(llm, tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nJSON please<|im_end|>\n<|im_start|>assistant\n<think>\n")
    spec = so(json=SCHEMA)
    for budget in (0, 5):  # the budget forces "</think>\n\n": the grammar starts after it, whitespace allowed
        c = llm.generate([prompt], greedy(spec, thinking_budget=budget, max_tokens=80), use_tqdm=False)[0].outputs[0]
        parsed = parse(c.text, thinking=True)
        assert c.finish_reason == "stop"
        assert_valid_json(parsed.content)
        think_end = c.token_ids.index(tokenizer.token_to_id("</think>"))
        assert think_end == budget
        if budget:  # the reasoning tokens were not constrained: the same as without a grammar
            free = llm.generate([prompt], greedy(None, thinking_budget=budget, max_tokens=budget), use_tqdm=False)
            assert c.token_ids[:budget] == free[0].outputs[0].token_ids[:budget]
    # a prompt that closed its think block: the grammar applies from the first token
    closed = tokenizer.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    c = llm.generate([closed], greedy(so(choice=["A1", "B2"])), use_tqdm=False)[0].outputs[0]
    assert c.text in ("A1", "B2")


def test_chunked_prefill_and_preemption_keep_the_matchers(llm, tokenizer):
    prompts = random_prompts([300, 280, 260, 240], vocab=5000, seed=2)
    params = [greedy(so(json=SCHEMA), max_tokens=70), sampled(so(json=SCHEMA), 3, max_tokens=70)] * 2
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids
             for p, sp in zip(prompts, params, strict=True)]
    region = CacheLayout.of(llm.engine.model.config.text, torch.float32).region_bytes
    small = qwen35.LLM(llm.engine.model, tokenizer=tokenizer, kv_cache_memory_bytes=48 * region, max_model_len=512,
                       max_num_batched_tokens=64, max_num_seqs=4)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    for o in outs:
        assert_valid_json(o.outputs[0].text)


# ------------------------------------------------------------------------------------------ tool calls
def _check_calls(text, tools, allowed_names):
    parsed = parse(text, tools=tools, thinking=False)
    assert parsed.tool_calls, text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call_ in parsed.tool_calls:
        name = call_["function"]["name"]
        assert name in allowed_names
        args = json.loads(call_["function"]["arguments"])
        assert jsonschema_rs.validator_for(schemas[name]).is_valid(args), (name, args)
    return parsed.tool_calls


def test_tool_call_grammar_required_named_and_parallel(llm):
    required = tool_call_grammar(TOOLS, "required", parallel_tool_calls=False)
    named = tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    parallel = tool_call_grammar(TOOLS, "required", parallel_tool_calls=True)
    params = [sampled(required, s, max_tokens=150) for s in range(4)] + \
        [sampled(named, s, max_tokens=150) for s in range(2)] + [greedy(named, max_tokens=150)] + \
        [sampled(parallel, 7, max_tokens=300)]
    outs = llm.generate(["Call a tool"] * len(params), params, use_tqdm=False)
    for i, o in enumerate(outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (i, c.text)
        names = {"get_weather"} if 4 <= i < 7 else {"get_weather", "get_time"}
        calls = _check_calls(c.text, TOOLS, names)
        if i < 7:
            assert len(calls) == 1


def test_tool_call_grammar_errors():
    with pytest.raises(ValueError, match="not among the tools"):
        tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_grammar([], "required")
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {},
                                                                         "required": ["x"]}}}
    with pytest.raises(ValueError, match=r"required parameters \['x'\]"):
        tool_call_grammar([bad], "required")


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,field,match", [
    ({}, None, "exactly one"),
    ({"json": SCHEMA, "regex": "a"}, None, "exactly one"),
    ({"choice": []}, "choice", "non-empty list"),
    ({"choice": ["a", 1]}, "choice", "strings only"),
    ({"json": "{not json"}, "json", "not valid JSON"),
    ({"json": [1]}, "json", "JSON schema"),
    ({"regex": ""}, "regex", "non-empty string"),
    ({"json_object": "yes"}, "json_object", "must be true"),
])
def test_malformed_specs_raise_naming_the_field(kw, field, match):
    with pytest.raises(ValueError, match=match) as e:
        StructuredOutputsParams(**kw)
    if field:
        assert f"structured_outputs.{field}" in str(e.value)
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams(structured_outputs={"jsonn": {}})


@pytest.mark.parametrize("spec,field,match", [
    (dict(regex="a(b"), "regex", "unclosed group"),
    (dict(json={"type": "objectx"}), "json", "objectx"),
    (dict(json={"type": "string", "pattern": "(?=x)"}), "json", "look-around"),
    (dict(grammar="start: foo"), "grammar", "unknown name"),
    (dict(grammar="root ::= ("), "grammar", "GBNF"),
])
def test_specs_that_do_not_compile_raise_at_submission(llm, spec, field, match):
    before = llm.engine.get_num_unfinished_requests()
    with pytest.raises(ValueError, match=match) as e:
        llm.engine.add_request(None, "x", greedy(so(**spec)))
    assert str(e.value).startswith(f"structured_outputs.{field}")
    assert llm.engine.get_num_unfinished_requests() == before  # nothing queued


def test_response_format_mapping():
    assert structured_from_response_format({"type": "text"}) is None
    assert structured_from_response_format({"type": "json_object"}).json_object is True
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    assert structured_from_response_format(rf).json == SCHEMA
    with pytest.raises(ValueError, match="response_format.type"):
        structured_from_response_format({"type": "xml"})
    with pytest.raises(ValueError, match="response_format.json_schema"):
        structured_from_response_format({"type": "json_schema"})


def test_compiled_once_and_cached(llm, tokenizer):
    compiler = GrammarCompiler.for_tokenizer(tokenizer, llm.engine.vocab_size, llm.engine.eos_token_ids)
    spec = so(regex=r"cache-me-[0-9]")
    before = compiler.compiled
    llm.generate(["a", "b"], [greedy(spec), sampled(spec, 1, n=2)], use_tqdm=False)
    assert compiler.compiled == before + 1


# ------------------------------------------------------------------------------------------ the masked screen
@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="the CPU kernels could not be built")
def test_masked_screen_equals_the_masked_full_logits():
    g = torch.Generator().manual_seed(0)
    V, K = 6000, 256
    w = (torch.randn(V, K, generator=g) * 0.02).to(torch.bfloat16)
    screen = HeadScreen(w)
    for trial in range(8):
        M = 1 + trial % 11 if trial % 4 else 12
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        density = [0.9, 0.5, 0.02, 0.001][trial % 4]  # wide masks screen, narrow ones compute their rows
        allowed = torch.rand(M, V, generator=g) < density
        allowed[:, trial] = True
        logits = torch.nn.functional.linear(x.float(), w.float())
        ref = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
        got = screen.masked_argmax(x, allowed)
        assert torch.equal(got, ref), (trial, got, ref)
        # wide masks that forbid each row's own argmax: the screen runs again with the mask
        allowed = torch.ones(M, V, dtype=torch.bool)
        allowed[torch.arange(M), logits.argmax(-1)] = False
        ref = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
        assert torch.equal(screen.masked_argmax(x, allowed), ref), trial


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="the CPU kernels could not be built")
def test_greedy_grammar_rows_through_the_screen_equal_the_full_logit_path(folder, tokenizer):
    model = make_model(folder).to(torch.bfloat16)
    llm = qwen35.LLM(model, tokenizer=tokenizer, kv_cache_memory_bytes=1 << 25, max_model_len=512)
    assert llm.engine.runner.head_screen
    params = [greedy(so(json=SCHEMA)), greedy(so(choice=["alpha", "beta"])), SamplingParams(temperature=0,
                                                                                            max_tokens=12)]
    prompts = ["Person:", "Pick", "Free"]
    screen = llm.engine.runner.model._usable_head_screen()
    masked_calls = []
    real_masked_argmax = screen.masked_argmax
    screen.masked_argmax = lambda x, allowed: masked_calls.append(len(x)) or real_masked_argmax(x, allowed)
    screened = llm.generate(prompts, params, use_tqdm=False)
    assert masked_calls and max(masked_calls) == 2  # the grammar rows of a step went through the screen together
    llm.engine.runner.greedy_shortcut = False  # the slow twin: full fp32 logits, masked in the sampler
    try:
        reference = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.runner.greedy_shortcut = True
    assert [o.outputs[0].token_ids for o in screened] == [o.outputs[0].token_ids for o in reference]
    assert_valid_json(screened[0].outputs[0].text)


# ------------------------------------------------------------------------------------------ MTP
def test_mtp_gives_grammar_rows_no_drafts(folder, tokenizer):
    model = make_model(folder)
    on = qwen35.LLM(model, tokenizer=tokenizer, kv_cache_memory_bytes=1 << 24, max_model_len=512,
                    speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    off = qwen35.LLM(model, tokenizer=tokenizer, kv_cache_memory_bytes=1 << 24, max_model_len=512)
    params = [greedy(so(json=SCHEMA)), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)]
    want = off.generate(["Person:", "Story"], params, use_tqdm=False)
    got = on.generate(["Person:", "Story"], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert on.engine.spec_stats.num_drafts > 0  # the free row speculated
    assert_valid_json(got[0].outputs[0].text)


# ------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(llm):
    with ServerThread(llm, ServerConfig(served_model_name="tiny")) as srv:
        yield srv


def test_completions_with_structured_outputs_and_response_format(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = client.completions.create(model="tiny", prompt="Person:", max_tokens=60, temperature=0,
                                  extra_body={"structured_outputs": {"json": SCHEMA}})
    assert_valid_json(r.choices[0].text)
    r = client.completions.create(model="tiny", prompt=["A", "B"], max_tokens=10, n=2, seed=3,
                                  extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert all(c.text in ("up", "down") for c in r.choices) and len(r.choices) == 4
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    r = client.completions.create(model="tiny", prompt="Person:", max_tokens=60, temperature=0,
                                  extra_body={"response_format": rf})
    assert_valid_json(r.choices[0].text)


@pytest.mark.parametrize("body,param,match", [
    ({"structured_outputs": {"json": {"type": "objectx"}}}, "structured_outputs", "objectx"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed group"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}}, "response_format",
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
])
def test_completions_malformed_schema_is_a_400_naming_it(server, body, param, match):
    r = call(server.port, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4, **body})
    assert r.status == 400, r.body
    err = r.error
    assert err["param"] == param and match in err["message"], err
    ok = call(server.port, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status == 200  # the server goes on
