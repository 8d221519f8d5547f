"""The OpenAI-compatible server, run for real (uvicorn on loopback, in a thread) and driven by the `openai`
client: chat and completions (plain and streamed), tools, reasoning, concurrency, disconnects, errors, auth.

The model is tiny and random but has the real vocabulary; where a test needs particular output (tool calls,
reasoning), a scripted sampler (tests/test_server_support.py) replaces the sampled tokens of the sequences
whose prompt it recognises, everything else in the engine staying real.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import time

import openai
import pytest
from test_server_support import (
    ServerThread,
    call,
    get_metrics,
    install_scripts,
    last_user_message,
    make_llm,
    metric,
    sse_events,
    tiny_model,
)

from qwen35.server import MediaPolicy, ServerConfig

MODEL = "tiny-qwen"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                  "properties": {}}}}

CALL_PARIS = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
              "</parameter>\n</function>\n</tool_call>")
CALL_ROME = CALL_PARIS.replace("Paris", "Rome")


def weather_script(prompt: str) -> str | None:
    user = last_user_message(prompt)
    if "<tool_response>" in user:
        return "The tool says sunny.\n</think>\n\nIt is sunny in Paris."
    if "weather" not in user:
        return None
    if prompt.endswith("</think>\n\n"):  # tool_choice required / named: the server closed the think block
        return CALL_PARIS
    calls = CALL_PARIS + "\n" + CALL_ROME if "two cities" in user else CALL_PARIS
    return "I should call the tool.\n</think>\n\n" + calls


def hello_script(prompt: str) -> str | None:
    if "Say hello" not in last_user_message(prompt):
        return None
    if prompt.endswith("<think>\n"):
        return "The user greets me.\n</think>\n\nHello there!"
    return "Hello there!"


def long_think_script(prompt: str) -> str | None:
    if "Think long" not in last_user_message(prompt):
        return None
    return " ".join(f"step{i}" for i in range(30)) + "\n</think>\n\nDone."


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("server") / "tiny")


@pytest.fixture(scope="module")
def server(model):
    llm = make_llm(model)
    install_scripts(llm, [weather_script, hello_script, long_think_script])
    with ServerThread(llm, ServerConfig(served_model_name=MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content, **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def stream_chat(client, content, **kw):
    """Stream and assemble: (role, reasoning, content, tool calls by index, finish reasons, usage, chunks)."""
    kw.setdefault("max_tokens", 12)
    role, reasoning, text, calls, finish, usage, chunks = None, "", "", {}, [], None, []
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                stream=True, **kw):
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            role = role or d.role
            reasoning += getattr(d, "reasoning_content", None) or ""
            text += d.content or ""
            for tc in d.tool_calls or ():
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
            if c.finish_reason:
                finish.append(c.finish_reason)
    return role, reasoning or None, text or None, calls, finish, usage, chunks


# ------------------------------------------------------------------------------------------ basics
def test_models_health_openapi(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = call(server.port, "GET", "/health")
    assert r.status == 200 and r.json() == {"status": "ok"}
    spec = call(server.port, "GET", "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    chat_op = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "404", "413"} <= set(chat_op["responses"]) and "422" not in chat_op["responses"]
    assert "text/event-stream" in chat_op["responses"]["200"]["content"]
    body = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "tool_choice", "stream_options", "top_k", "min_p", "repetition_penalty",
            "chat_template_kwargs", "thinking_budget", "logprobs", "top_logprobs", "seed"} <= set(body)


def test_chat_stream_equals_plain(client):
    for kwargs in ({}, {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}):
        plain = chat(client, "Tell me a story", temperature=0, **kwargs)
        msg = plain.choices[0].message
        role, reasoning, text, calls, finish, usage, chunks = stream_chat(
            client, "Tell me a story", temperature=0, stream_options={"include_usage": True}, **kwargs)
        assert role == "assistant" and not calls
        assert (reasoning, text) == (getattr(msg, "reasoning_content", None), msg.content)
        assert finish == [plain.choices[0].finish_reason] == ["length"]
        assert usage.completion_tokens == plain.usage.completion_tokens == 12
        assert usage.prompt_tokens == plain.usage.prompt_tokens
        assert len({c.id for c in chunks}) == 1 and chunks[-1].choices == []
    # thinking on (the template's default here): the random model never closes the think block
    assert chat(client, "Tell me a story", temperature=0).choices[0].message.reasoning_content


def test_chat_sampling_n_seed_logprobs(client):
    kw = dict(temperature=0.9, seed=1234, n=3, max_tokens=6, logprobs=True, top_logprobs=3,
              extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True})
    a = chat(client, "Pick words", **kw)
    b = chat(client, "Pick words", **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.reasoning_content for c in a.choices]
    assert texts == [c.message.reasoning_content for c in b.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # each choice its own stream
    assert a.usage.completion_tokens == 18
    for c in a.choices:
        lp = c.logprobs.content
        assert len(lp) == 6
        for t in lp:
            assert len(t.top_logprobs) == 3
            vals = [x.logprob for x in t.top_logprobs]
            assert vals == sorted(vals, reverse=True) and t.logprob <= vals[0] + 1e-6
            assert bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token
    # max_completion_tokens wins over max_tokens; stop strings cut the text
    r = chat(client, "Tell me a story", temperature=0, max_tokens=3, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5


def test_completions(server, client):
    a = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    ch = a.choices[0]
    assert ch.finish_reason == "length" and a.usage.completion_tokens == 5 and ch.text
    ids = server.serving.tokenizer.encode("The capital of France is")
    b = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert b.choices[0].text == "The capital of France is" + ch.text and b.usage.prompt_tokens == len(ids)
    # streamed: same text, chunks per token
    pieces = []
    for chunk in client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                           temperature=0, stream=True, stream_options={"include_usage": True}):
        pieces.extend(c.text for c in chunk.choices)
        if chunk.usage:
            assert chunk.usage.completion_tokens == 5
    assert "".join(pieces) == ch.text
    # several prompts, n each, logprobs
    c = client.completions.create(model=MODEL, prompt=["One", "Two"], n=2, max_tokens=3, temperature=0.8, seed=5,
                                  logprobs=2)
    assert [x.index for x in c.choices] == [0, 1, 2, 3] and c.usage.completion_tokens == 12
    for x in c.choices:
        assert len(x.logprobs.tokens) == 3 and len(x.logprobs.token_logprobs) == 3
        assert all(len(t) >= 2 for t in x.logprobs.top_logprobs)
        assert "".join(x.logprobs.tokens) == x.text


# ------------------------------------------------------------------------------------------ tools, reasoning
def test_tool_loop(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL, CLOCK_TOOL],
                                           max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "I should call the tool."
    assert choice.message.content is None
    [tc] = choice.message.tool_calls
    assert tc.type == "function" and tc.function.name == "get_weather" and tc.id
    assert json.loads(tc.function.arguments) == {"city": "Paris", "days": 3}  # typed by the schema
    # the same, streamed: the call arrives whole, with its index
    _, reasoning, text, calls, finish, _, _ = stream_chat(client, "What is the weather in Paris?",
                                                          tools=[WEATHER_TOOL], max_tokens=80)
    assert reasoning == "I should call the tool." and text is None and finish == ["tool_calls"]
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 3}
    # the tool's answer goes back; the model answers
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": tc.id, "content": json.dumps({"forecast": "sunny"})})
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=80)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].message.reasoning_content == "The tool says sunny."
    assert not second.choices[0].message.tool_calls


def test_tool_choice(client):
    ask = "What is the weather in Paris?"
    # none: tools left out of the prompt; the call text stays text
    with_tools = chat(client, ask, tools=[WEATHER_TOOL], max_tokens=80)
    none = chat(client, ask, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=80)
    assert none.usage.prompt_tokens < with_tools.usage.prompt_tokens
    assert none.choices[0].finish_reason == "stop" and not none.choices[0].message.tool_calls
    assert "<tool_call>" in none.choices[0].message.content
    # required and named: the server writes the call's start (no reasoning), the model fills it in
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = chat(client, ask, tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice=choice, max_tokens=80)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.reasoning_content is None
        assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == \
            [("get_weather", {"city": "Paris", "days": 3})]
        _, reasoning, _, calls, finish, _, _ = stream_chat(client, ask, tools=[WEATHER_TOOL], tool_choice=choice,
                                                           max_tokens=80)
        assert finish == ["tool_calls"] and calls[0]["name"] == "get_weather" and reasoning is None
    # parallel calls, and parallel_tool_calls=false keeping only the first
    two = "What is the weather in two cities?"
    both = chat(client, two, tools=[WEATHER_TOOL], max_tokens=120)
    assert [json.loads(t.function.arguments)["city"] for t in both.choices[0].message.tool_calls] == ["Paris", "Rome"]
    _, _, _, calls, _, _, _ = stream_chat(client, two, tools=[WEATHER_TOOL], max_tokens=120)
    assert [json.loads(calls[i]["arguments"])["city"] for i in sorted(calls)] == ["Paris", "Rome"]
    one = chat(client, two, tools=[WEATHER_TOOL], parallel_tool_calls=False, max_tokens=120)
    assert [json.loads(t.function.arguments)["city"] for t in one.choices[0].message.tool_calls] == ["Paris"]
    assert one.choices[0].finish_reason == "tool_calls" and one.usage.completion_tokens < both.usage.completion_tokens
    # invalid choices
    for bad in ({"type": "function", "function": {"name": "nope"}}, "required"):
        with pytest.raises(openai.BadRequestError):
            chat(client, ask, tools=[WEATHER_TOOL] if bad != "required" else None, tool_choice=bad)


def test_reasoning_split(server, client):
    on = chat(client, "Say hello", max_tokens=40).choices[0]
    assert (on.message.reasoning_content, on.message.content, on.finish_reason) == \
        ("The user greets me.", "Hello there!", "stop")
    off = chat(client, "Say hello", max_tokens=40,
               extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0]
    assert (getattr(off.message, "reasoning_content", None), off.message.content) == (None, "Hello there!")
    for body, want in (({}, ("The user greets me.", "Hello there!")),
                       ({"chat_template_kwargs": {"enable_thinking": False}}, (None, "Hello there!"))):
        _, reasoning, text, _, finish, _, _ = stream_chat(client, "Say hello", max_tokens=40, extra_body=body)
        assert (reasoning, text) == want and finish == ["stop"]
    # a thinking budget: the engine closes the think block after 3 reasoning tokens
    tok = server.serving.tokenizer
    script = tok.encode(long_think_script("<|im_start|>user\nThink long<|im_end|>"))
    r = chat(client, "Think long", max_tokens=150, extra_body={"thinking_budget": 3}).choices[0]
    assert r.message.reasoning_content == tok.decode(script[:3]).strip()
    assert r.message.content and r.finish_reason == "stop"
    unlimited = chat(client, "Think long", max_tokens=150).choices[0]
    assert unlimited.message.reasoning_content.endswith("step29") and unlimited.message.content == "Done."


def test_chat_extras(client):
    """The reasoning under both names (and either accepted in history), reasoning_effort, usage in every chunk,
    n with tools, system messages mid-conversation folded."""
    on = chat(client, "Say hello", max_tokens=40).choices[0]
    assert on.message.reasoning == on.message.reasoning_content == "The user greets me."
    _, _, _, _, _, _, chunks = stream_chat(client, "Say hello", max_tokens=40)
    deltas = [c.choices[0].delta for c in chunks if c.choices and getattr(c.choices[0].delta, "reasoning", None)]
    assert deltas and all(d.reasoning == d.reasoning_content for d in deltas)
    off = chat(client, "Say hello", max_tokens=40, reasoning_effort="none").choices[0]
    assert (getattr(off.message, "reasoning_content", None), off.message.content) == (None, "Hello there!")
    assert chat(client, "Say hello", max_tokens=40, reasoning_effort="high").choices[0].message.reasoning
    for key in ("reasoning", "reasoning_content"):
        history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey", key: "greeting"},
                   {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
        r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=40)
        assert r.choices[0].message.content == "Hello there!"
    # continuous usage: every chunk carries the usage so far
    _, _, _, _, _, _, chunks = stream_chat(client, "Say hello", max_tokens=40,
                                           stream_options={"include_usage": True},
                                           extra_body={"stream_options": {"include_usage": True,
                                                                          "continuous_usage_stats": True}})
    counts = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert len(counts) >= len(chunks) - 1 and counts == sorted(counts) and counts[-1] > 0
    # n with tools: every choice parses its own call
    r = chat(client, "What is the weather in Paris?", tools=[WEATHER_TOOL], max_tokens=80, n=3)
    assert [c.finish_reason for c in r.choices] == ["tool_calls"] * 3
    assert all(c.message.tool_calls[0].function.name == "get_weather" for c in r.choices)


# ------------------------------------------------------------------------------------------ concurrency
def test_64_concurrent_streams_equal_alone(server):
    aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def request(i: int) -> dict:
        kw = {"model": MODEL, "messages": [{"role": "user", "content": f"Request {i}: tell me about {i * 7}"}],
              "max_tokens": 4 + i % 5, "stream": True, "stream_options": {"include_usage": True},
              "extra_body": {"chat_template_kwargs": {"enable_thinking": i % 2 == 0}}}
        kw.update({"temperature": 0} if i % 3 else {"temperature": 0.8, "seed": i})
        return kw

    async def run(i: int) -> tuple:
        first_role, text, reasoning, finishes, usage, ids = None, "", "", [], None, set()
        async for chunk in await aclient.chat.completions.create(**request(i)):
            ids.add(chunk.id)
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
                assert chunk.choices == []
                continue
            [c] = chunk.choices
            assert not finishes, "nothing may follow the finish chunk but usage"
            if first_role is None:
                first_role = c.delta.role
            text += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
        assert first_role == "assistant" and len(ids) == 1 and finishes == ["length"] and usage == 4 + i % 5
        return text, reasoning, usage

    async def both() -> tuple[list[tuple], list[tuple], float, float]:
        t0 = time.monotonic()
        together = await asyncio.gather(*(run(i) for i in range(64)))
        t1 = time.monotonic()
        alone = [await run(i) for i in range(64)]
        await aclient.close()
        return together, alone, t1 - t0, time.monotonic() - t1

    concurrent, sequential, t_together, t_alone = asyncio.run(both())
    assert concurrent == sequential
    assert len({c[0] + c[1] for c in concurrent}) > 32  # different prompts, different outputs
    print(f"64 concurrent streams: {t_together:.1f}s; one by one: {t_alone:.1f}s")


def test_disconnect_frees_cache(server):
    port = server.port
    base = get_metrics(port)
    assert metric(base, "qwen35_kv_cache_blocks_used") == 0 and metric(base, "qwen35_state_slots_used") == 0
    aborts = metric(base, "qwen35_requests_total", 'endpoint="chat",finish_reason="abort"')
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever"}], "max_tokens": 900,
            "stream": True, "ignore_eos": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    got = b""
    while got.count(b"\n\n") < 4:  # the role chunk and a few tokens
        got += resp.read1(4096)
    during = get_metrics(port)
    assert metric(during, "qwen35_state_slots_used") == 1 and metric(during, "qwen35_kv_cache_blocks_used") >= 1
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 20
    while True:
        now = get_metrics(port)
        if metric(now, "qwen35_kv_cache_blocks_used") == 0 and metric(now, "qwen35_state_slots_used") == 0 and \
                metric(now, "qwen35_requests_total", 'endpoint="chat",finish_reason="abort"') == aborts + 1:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    generated = metric(now, "qwen35_generation_tokens_total") - metric(base, "qwen35_generation_tokens_total")
    assert generated < 900  # stopped, not run to its end
    assert metric(now, "qwen35_num_requests_running") == 0 and metric(now, "qwen35_num_requests_waiting") == 0


def test_prefix_cache_reports_cached_tokens(server, client):
    system = "You are a careful assistant. " * 40  # ~240 tokens shared by both requests
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system},
                                                                  {"role": "user", "content": "Hi"}],
                                           max_tokens=2, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system},
                                                                   {"role": "user", "content": "Bye"}],
                                            max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 192 and cached % 64 == 0 and cached < second.usage.prompt_tokens
    text = get_metrics(server.port)
    assert metric(text, "qwen35_prefix_cache_hits_total") >= cached
    assert metric(text, "qwen35_prefix_cache_queries_total") >= first.usage.prompt_tokens + second.usage.prompt_tokens


def test_metrics(server, client):
    chat(client, "Tell me a story", temperature=0, max_tokens=4)
    text = get_metrics(server.port)
    for name in ("qwen35_time_to_first_token_seconds_count", "qwen35_inter_token_latency_seconds_count",
                 "qwen35_e2e_request_latency_seconds_count", "qwen35_prompt_tokens_total",
                 "qwen35_generation_tokens_total", "qwen35_kv_cache_blocks_total", "qwen35_state_slots_total"):
        assert metric(text, name) > 0, name
    assert metric(text, "qwen35_http_requests_total",
                  'method="POST",route="/v1/chat/completions",status="200"') >= 1
    assert "# TYPE qwen35_time_to_first_token_seconds histogram" in text
    assert 'qwen35_time_to_first_token_seconds_bucket{le="+Inf"}' in text


# ------------------------------------------------------------------------------------------ errors
def test_errors(server, tmp_path):
    port = server.port
    url = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "Hi"}]

    def err(status, body=None, path=url, method="POST", **kw):
        r = call(port, method, path, body, **kw)
        assert r.status == status, (r.status, r.body[:300])
        return r.error

    assert err(400, raw=b'{"messages": [')["code"] == "invalid_json"
    assert err(400, raw=b"[1, 2]")["type"] == "invalid_request_error"
    assert err(400, {"model": MODEL})["param"] == "messages"
    assert err(400, {"messages": msgs, "n": 0})["param"] == "n"
    assert err(400, {"messages": msgs, "temperature": -1})["param"] == "temperature"
    assert err(400, {"messages": msgs, "top_p": 1.5})["param"] == "top_p"
    assert err(400, {"messages": msgs, "max_tokens": 0})["param"] == "max_tokens"
    assert err(400, {"messages": msgs, "top_logprobs": 50, "logprobs": True})["param"] == "top_logprobs"
    assert err(400, {"messages": [{"role": "wizard", "content": "x"}]})["param"].startswith("messages")
    assert err(400, {"messages": [{"role": "assistant", "content": "only me"}]})["code"] == "invalid_chat"
    assert err(400, {"messages": msgs, "stream_options": {"include_usage": True}})["param"] == "stream_options"
    assert err(400, {"messages": msgs, "response_format": {"type": "xml"}})["param"] == "response_format"
    assert err(404, {"messages": msgs, "model": "gpt-4"})["code"] == "model_not_found"
    long_text = "word " * 1200
    assert err(400, {"messages": [{"role": "user", "content": long_text}]})["code"] == "context_length_exceeded"
    assert err(400, {"messages": msgs, "max_tokens": 5000})["code"] == "context_length_exceeded"
    assert err(400, {"prompt": long_text}, path="/v1/completions")["code"] == "context_length_exceeded"
    assert err(400, {"prompt": [1, 2, 10**7]}, path="/v1/completions")["param"] == "prompt"
    assert err(400, {"prompt": []}, path="/v1/completions")["param"] == "prompt"
    assert err(400, {"prompt": "x", "max_tokens": 0}, path="/v1/completions")["param"] == "max_tokens"
    assert err(404, path="/v1/nothing", method="GET")["type"] == "invalid_request_error"
    assert err(405, path="/v1/chat/completions", method="GET")
    # media: http(s) and files refused unless allowed; data: URLs refused while the engine takes no images
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    for image_url, code in (("https://example.com/cat.png", "media_not_allowed"),
                            (f"file://{tmp_path}/cat.png", "media_not_allowed"),
                            (f"data:image/png;base64,{png}", "images_not_supported")):
        m = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": image_url}}]}]
        assert err(400, {"messages": m})["code"] == code
    # the server is fine after all that
    assert call(port, "GET", "/health").status == 200
    r = call(port, "POST", url, {"messages": msgs, "max_tokens": 2})
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_local_media_policy(tmp_path):
    pol = MediaPolicy(local_root=tmp_path)
    (tmp_path / "a.png").write_bytes(b"x")
    assert pol.check(f"file://{tmp_path}/a.png", "p") == str((tmp_path / "a.png").resolve())
    from qwen35.server.errors import APIError

    for bad in (f"file://{tmp_path}/../etc/passwd", "file:///etc/passwd", "ftp://x/y.png", "x.png"):
        with pytest.raises(APIError):
            pol.check(bad, "p")


def test_raw_stream_framing(server):
    r = call(server.port, "POST", "/v1/completions",
             {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True, "n": 2})
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    assert sorted(c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]) == \
        ["length", "length"]


def test_auth(model):
    llm = make_llm(model, max_model_len=256)
    with ServerThread(llm, ServerConfig(served_model_name=MODEL, api_key="s3cret")) as srv:
        port = srv.port
        assert call(port, "GET", "/health").status == 200  # no key needed
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            assert call(port, "GET", path).error["type"] == "authentication_error"
            assert call(port, "GET", path, headers={"Authorization": "Bearer wrong"}).status == 401
            assert call(port, "GET", path, headers={"Authorization": "Bearer s3cret"}).status == 200
        assert call(port, "POST", "/v1/completions", {"prompt": "x"}).status == 401
        good = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="s3cret", max_retries=0)
        bad = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="nope", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
        spec = call(port, "GET", "/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
        assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_disconnect_before_the_answer(server):
    """A client that leaves a plain (not streamed) request also frees its cache at once."""
    port = server.port
    base = get_metrics(port)
    aborts = metric(base, "qwen35_requests_total", 'endpoint="completions",finish_reason="abort"')
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Go on", "max_tokens": 900, "ignore_eos": True}),
                 headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while metric(get_metrics(port), "qwen35_state_slots_used") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    conn.sock.shutdown(2)
    conn.close()
    while True:
        now = get_metrics(port)
        if metric(now, "qwen35_state_slots_used") == 0 and metric(now, "qwen35_kv_cache_blocks_used") == 0 and \
                metric(now, "qwen35_requests_total", 'endpoint="completions",finish_reason="abort"') == aborts + 1:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert metric(now, "qwen35_generation_tokens_total") - metric(base, "qwen35_generation_tokens_total") < 900


def test_engine_failure_is_contained(model):
    """A step that raises fails the requests in flight with a 500 (or an error event in a stream); the server
    and later requests go on."""
    llm = make_llm(model, max_model_len=256)
    real_run, tok = llm.engine.runner.run, llm.tokenizer

    def run(work, plan):
        for seq in work.seqs:
            if "BOOM" in tok.decode(seq.token_ids[:seq.num_prompt_tokens]):
                raise RuntimeError("injected failure")
        return real_run(work, plan)

    llm.engine.runner.run = run
    with ServerThread(llm, ServerConfig(served_model_name=MODEL)) as srv:
        r = call(srv.port, "POST", "/v1/completions", {"prompt": "BOOM", "max_tokens": 4})
        assert r.status == 500 and r.error["code"] == "engine_error" and r.error["type"] == "server_error"
        r = call(srv.port, "POST", "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "BOOM"}], "max_tokens": 4, "stream": True})
        events = sse_events(r.body)
        assert r.status == 200 and events[-1] == "[DONE]" and "error" in json.loads(events[-2])
        ok = call(srv.port, "POST", "/v1/completions", {"prompt": "fine", "max_tokens": 4})
        assert ok.status == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert call(srv.port, "GET", "/health").status == 200
        m = get_metrics(srv.port)
        assert metric(m, "qwen35_state_slots_used") == 0 and metric(m, "qwen35_kv_cache_blocks_used") == 0
        assert metric(m, "qwen35_requests_total", 'endpoint="completions",finish_reason="error"') == 1


def test_body_limit(model):
    llm = make_llm(model, max_model_len=256)
    with ServerThread(llm, ServerConfig(served_model_name=MODEL, max_body_bytes=64 << 10)) as srv:
        big = json.dumps({"prompt": "x" * (100 << 10)}).encode()
        r = call(srv.port, "POST", "/v1/completions", raw=big)
        assert r.status == 413 and r.error["code"] == "request_too_large"
        # no Content-Length (chunked): counted while reading
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/v1/completions", body=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
        conn.close()
        small = call(srv.port, "POST", "/v1/completions", {"prompt": "x" * 1000, "max_tokens": 1})
        assert small.status == 200
