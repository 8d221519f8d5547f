"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) on a real server on loopback, driven by
the real `anthropic` client: create and stream, thinking, tools and the tool_use / tool_result round trip,
count_tokens, usage with the prefix cache, x-api-key auth, errors in Anthropic's shape.

The model is tiny and random with the real vocabulary; where a test needs particular output (thinking, a tool
call) a scripted sampler (tests/test_server_support.py) replaces the sampled tokens of the prompts it
recognises, everything else in the engine staying real.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import anthropic
import openai
import pytest
from test_engine_support import TINY
from test_server_support import (
    ServerThread,
    call,
    get_metrics,
    install_scripts,
    last_user_message,
    make_llm,
    metric,
    tiny_model,
)
from test_server_vision import IDS, VISION, data_url, picture

import qwen35
from qwen35.server import MediaPolicy, ServerConfig
from qwen35.server.anthropic import with_pings

MODEL = "tiny-qwen"
KEY = "s3cret"
AUTH = {"x-api-key": KEY}
MAX_MODEL_LEN = 1024

WEATHER = {"name": "get_weather", "description": "Weather forecast for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city"]}}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}  # an Anthropic server tool

CALL_PARIS = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
              "</parameter>\n</function>\n</tool_call>")
THINK_STEPS = " ".join(f"step{i}" for i in range(30))


def script(prompt: str) -> str | None:
    user = last_user_message(prompt)
    thinking = prompt.endswith("<think>\n")
    if "<tool_response>" in user:
        return "The tool says sunny.\n</think>\n\nIt is sunny in Paris." if thinking else "It is sunny in Paris."
    if "Say hello" in user:
        return "The user greets me.\n</think>\n\nHello there!" if thinking else "Hello there!"
    if "weather" in user:
        if prompt.endswith("</think>\n\n") and "<tools>" in prompt and not thinking:
            return CALL_PARIS  # tool_choice any / tool (or thinking off): the grammar allows only a call
        return ("I should call the tool.\n</think>\n\n" if thinking else "") + CALL_PARIS
    if "Count up" in user:
        return ("Counting.\n</think>\n\n" if thinking else "") + "one two STOP three four"
    if "Think long" in user:
        return THINK_STEPS + "\n</think>\n\nDone."
    if "Fill the context" in user:
        return "word " * 400
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    llm = make_llm(tiny_model(tmp_path_factory.mktemp("anthropic") / "tiny"), max_model_len=MAX_MODEL_LEN)
    install_scripts(llm, [script])
    runner, tok = llm.engine.runner, llm.tokenizer
    scripted_run = runner.run

    def run(work, plan):  # a prompt saying BOOM makes the engine step fail
        for seq in work.seqs:
            if "BOOM" in tok.decode(seq.token_ids[:seq.num_prompt_tokens]):
                raise RuntimeError("injected failure")
        return scripted_run(work, plan)

    runner.run = run
    config = ServerConfig(served_model_name=MODEL, api_key=KEY, max_body_bytes=1 << 20)
    with ServerThread(llm, config) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def raw_events(server, body: dict) -> list[tuple[str, dict]]:
    """POST a streamed request and read the event stream: (event name, data) pairs, checking the framing (an
    `event:` line and a `data:` line per event, the name repeated as the data's type)."""
    r = call(server.port, "POST", "/v1/messages", {"model": MODEL, "stream": True, **body}, headers=AUTH)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream"), r.body[:300]
    text = r.body.decode()
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block[:200]
        name, data = lines[0][len("event: "):], json.loads(lines[1][len("data: "):])
        assert data["type"] == name
        out.append((name, data))
    return out


def blocks(message) -> list[tuple]:
    """A message's content blocks as comparable tuples."""
    fields = {"thinking": ("thinking", "signature"), "text": ("text",), "tool_use": ("name", "input")}
    return [(b.type, *(getattr(b, f) for f in fields[b.type])) for b in message.content]


def anthropic_error(r, status: int) -> dict:
    assert r.status == status, (r.status, r.body[:300])
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    return body["error"]


# ------------------------------------------------------------------------------------------ create
def test_create_with_and_without_thinking(client):
    resp = client.messages.create(model=MODEL, max_tokens=64, messages=user("Say hello"))
    # no `thinking` field: the template's default, thinking on
    assert [b.type for b in resp.content] == ["thinking", "text"]
    assert resp.content[0].thinking == "The user greets me." and resp.content[0].signature
    assert resp.content[1].text == "Hello there!"
    assert resp.id.startswith("msg_") and resp.model == MODEL and resp.role == "assistant"
    assert resp.stop_reason == "end_turn" and resp.stop_sequence is None
    count = client.messages.count_tokens(model=MODEL, messages=user("Say hello")).input_tokens
    assert resp.usage.input_tokens + resp.usage.cache_read_input_tokens == count
    assert resp.usage.output_tokens > 5

    off = client.messages.create(model=MODEL, max_tokens=64, messages=user("Say hello"),
                                 thinking={"type": "disabled"})
    assert [(b.type, b.text) for b in off.content] == [("text", "Hello there!")]
    on = client.messages.create(model=MODEL, max_tokens=64, messages=user("Say hello"),
                                thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in on.content] == ["thinking", "text"]
    assert on.content[0].signature == resp.content[0].signature  # a digest of the same thinking
    omitted = client.messages.create(model=MODEL, max_tokens=64, messages=user("Say hello"),
                                     thinking={"type": "adaptive", "display": "omitted"})
    assert omitted.content[0].type == "thinking" and omitted.content[0].thinking == ""
    assert omitted.content[0].signature == resp.content[0].signature and omitted.content[1].text == "Hello there!"


def test_thinking_budget(client):
    budget = client.messages.create(model=MODEL, max_tokens=150, messages=user("Think long"),
                                    thinking={"type": "enabled", "budget_tokens": 3})
    thinking, text = budget.content[0].thinking, budget.content[-1].text
    assert budget.content[0].type == "thinking" and THINK_STEPS.startswith(thinking) and len(thinking) < 20
    assert text and budget.stop_reason == "end_turn"
    free = client.messages.create(model=MODEL, max_tokens=150, messages=user("Think long"))
    assert free.content[0].thinking == THINK_STEPS and free.content[1].text == "Done."


def test_stop_sequences_and_max_tokens(client):
    r = client.messages.create(model=MODEL, max_tokens=64, messages=user("Count up"), stop_sequences=["STOP"],
                               thinking={"type": "disabled"})
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "STOP"
    assert r.content[0].text == "one two"
    r = client.messages.create(model=MODEL, max_tokens=3, messages=user("Tell me anything"), metadata={"user_id": "u1"},
                               extra_body={"temperature": 0.8, "top_p": 0.9, "top_k": 20})  # the SDK dropped them
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3


def test_max_tokens_cut_to_the_context(client):
    """Clients send large max_tokens (Claude Code: 32000): cut to what the context leaves; an answer that fills
    the context says so."""
    def count(k: int) -> int:
        return client.messages.count_tokens(model=MODEL, messages=user("Fill the context " + "x " * k),
                                            thinking={"type": "disabled"}).input_tokens

    base = count(0)
    k = MAX_MODEL_LEN - 12 - base
    left = MAX_MODEL_LEN - count(k)
    assert 4 <= left <= 20
    r = client.messages.create(model=MODEL, max_tokens=32000, messages=user("Fill the context " + "x " * k),
                               thinking={"type": "disabled"})
    assert r.stop_reason == "model_context_window_exceeded" and r.usage.output_tokens == left
    # a prompt that does not fit at all is still an error
    with pytest.raises(anthropic.BadRequestError, match="context length"):
        client.messages.create(model=MODEL, max_tokens=8, messages=user("x " * (MAX_MODEL_LEN + 10)))


# ------------------------------------------------------------------------------------------ streaming
def test_stream_matches_create_and_event_order(server, client):
    whole = client.messages.create(model=MODEL, max_tokens=64, messages=user("Say hello"))
    with client.messages.stream(model=MODEL, max_tokens=64, messages=user("Say hello")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello there!"
    assert blocks(final) == blocks(whole)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens

    events = raw_events(server, {"max_tokens": 64, "messages": user("Say hello")})
    names = [n for n, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    starts = [d for n, d in events if n == "content_block_start"]
    assert [(b["index"], b["content_block"]["type"]) for b in starts] == [(0, "thinking"), (1, "text")]
    # each block: start, deltas of its own index, stop; the signature is the thinking block's last delta
    body = [(n, d) for n, d in events[2:-2]]
    i = 0
    for index, kind in ((0, "thinking"), (1, "text")):
        assert body[i][0] == "content_block_start" and body[i][1]["index"] == index
        i += 1
        deltas = []
        while body[i][0] == "content_block_delta":
            assert body[i][1]["index"] == index
            deltas.append(body[i][1]["delta"])
            i += 1
        assert body[i] == ("content_block_stop", {"type": "content_block_stop", "index": index})
        i += 1
        if kind == "thinking":
            assert [d["type"] for d in deltas[:-1]] == ["thinking_delta"] * (len(deltas) - 1)
            assert deltas[-1] == {"type": "signature_delta", "signature": whole.content[0].signature}
            assert "".join(d["thinking"] for d in deltas[:-1]) == "The user greets me."
        else:
            assert {d["type"] for d in deltas} == {"text_delta"}
            assert "".join(d["text"] for d in deltas) == "Hello there!"
    assert i == len(body)
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == whole.usage.output_tokens


def test_stream_tool_use_and_stop_sequence(server, client):
    with client.messages.stream(model=MODEL, max_tokens=80, messages=user("What is the weather in Paris?"),
                                tools=[WEATHER, CLOCK]) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    call_block = final.content[1]
    assert call_block.name == "get_weather" and call_block.input == {"city": "Paris", "days": 3}
    assert call_block.id.startswith("toolu_") and final.stop_reason == "tool_use"
    events = raw_events(server, {"max_tokens": 80, "messages": user("What is the weather in Paris?"),
                                 "tools": [WEATHER], "thinking": {"type": "disabled"}})
    assert [n for n, _ in events] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop"]
    assert events[2][1]["content_block"] == {"type": "tool_use", "id": events[2][1]["content_block"]["id"],
                                             "name": "get_weather", "input": {}}
    assert events[3][1]["delta"]["type"] == "input_json_delta"
    assert json.loads(events[3][1]["delta"]["partial_json"]) == {"city": "Paris", "days": 3}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    events = raw_events(server, {"max_tokens": 64, "messages": user("Count up"), "stop_sequences": ["STOP"]})
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}


def test_pings_while_waiting():
    """A ping whenever the engine is silent for the interval (a long prefill); leaving early closes the source."""
    closed = []

    async def slow():
        try:
            for i in range(3):
                await asyncio.sleep(0.25)
                yield i
        finally:
            closed.append(True)

    async def collect(limit: int | None):
        out = []
        gen = with_pings(slow(), 0.1)
        async for x in gen:
            out.append(x)
            if limit is not None and len([y for y in out if y is not None]) == limit:
                await gen.aclose()
                break
        await asyncio.sleep(0.05)  # let the cancelled reader finish
        return out

    out = asyncio.run(collect(None))
    assert [x for x in out if x is not None] == [0, 1, 2] and out.count(None) >= 4 and out[0] is None
    out = asyncio.run(collect(1))
    assert [x for x in out if x is not None] == [0] and closed == [True, True]


# ------------------------------------------------------------------------------------------ tools
def test_tool_use_round_trip(client):
    question = user("What is the weather in Paris?")
    first = client.messages.create(model=MODEL, max_tokens=80, messages=question, tools=[WEATHER, CLOCK, WEB_SEARCH])
    assert first.stop_reason == "tool_use"
    assert first.content[0].type == "thinking" and first.content[0].thinking == "I should call the tool."
    use = first.content[1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris", "days": 3}
    # the history goes back as the client got it: thinking (with its signature) and tool_use blocks
    history = [*question, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                             "content": [{"type": "text", "text": "sunny, 24 C"}]}]}]
    second = client.messages.create(model=MODEL, max_tokens=80, messages=history, tools=[WEATHER, CLOCK])
    assert [b.type for b in second.content] == ["thinking", "text"]
    assert second.content[1].text == "It is sunny in Paris." and second.stop_reason == "end_turn"
    # an error result and a redacted thinking block are accepted too
    history[1] = {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "opaque"},
                                                   *[b.model_dump() for b in first.content[1:]]]}
    history[2]["content"] = [{"type": "tool_result", "tool_use_id": use.id, "content": "no network",
                              "is_error": True}]
    third = client.messages.create(model=MODEL, max_tokens=80, messages=history, tools=[WEATHER],
                                   thinking={"type": "disabled"})
    assert third.content[-1].text == "It is sunny in Paris."
    plain = client.messages.count_tokens(model=MODEL, messages=history, tools=[WEATHER]).input_tokens
    failed = client.messages.count_tokens(model=MODEL, messages=[*history[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": use.id, "content": "no network"}]}], tools=[WEATHER]).input_tokens
    assert plain > failed  # "Error: " in front of the failed result


def test_tool_choice(client):
    msgs = user("What is the weather in Rome?")
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"},
                   {"type": "any", "disable_parallel_tool_use": True}):
        r = client.messages.create(model=MODEL, max_tokens=80, messages=msgs, tools=[WEATHER, CLOCK],
                                   tool_choice=choice)
        assert [b.type for b in r.content] == ["tool_use"], choice  # no reasoning before a forced call
        assert r.content[0].name == "get_weather" and r.content[0].input == {"city": "Paris", "days": 3}
        assert r.stop_reason == "tool_use"
    none = client.messages.create(model=MODEL, max_tokens=80, messages=msgs, tools=[WEATHER],
                                  tool_choice={"type": "none"}, thinking={"type": "disabled"})
    assert [b.type for b in none.content] == ["text"] and none.content[0].text.startswith("<tool_call>")
    assert none.stop_reason == "end_turn"


def test_forced_tool_call_with_random_weights(client):
    """Unscripted: the model writes what it likes after the forced call start; whatever parses as a call is a
    valid one, and the stop reason says whether there is one."""
    tools = [WEATHER, CLOCK]
    for i, choice in enumerate(({"type": "any"}, {"type": "tool", "name": "get_time"})):
        for stream in (False, True):
            kw = dict(model=MODEL, max_tokens=24, messages=user(f"Pick something {i}"), tools=tools,
                      tool_choice=choice, extra_body={"temperature": 1.0})
            if stream:
                with client.messages.stream(**kw) as s:
                    r = s.get_final_message()
            else:
                r = client.messages.create(**kw)
            uses = [b for b in r.content if b.type == "tool_use"]
            for b in uses:
                assert b.name in {"get_weather", "get_time"} and isinstance(b.input, dict)
                if choice["type"] == "tool":
                    assert b.name == "get_time"
            assert (r.stop_reason == "tool_use") == bool(uses)
            assert r.stop_reason in ("tool_use", "max_tokens", "end_turn")


def test_output_format_json_schema(server, client):
    """`output_config.format`: even random weights write JSON that follows the schema, after the reasoning."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "schema": schema}}
    for thinking in ({"type": "disabled"}, {"type": "enabled", "budget_tokens": 6}):
        r = client.messages.create(model=MODEL, max_tokens=60, messages=user("Give me JSON"), output_config=fmt,
                                   thinking=thinking)
        assert r.stop_reason == "end_turn", r.content
        value = json.loads(r.content[-1].text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and type(value["n"]) is int
        assert [b.type for b in r.content] == (["text"] if thinking["type"] == "disabled" else ["thinking", "text"])
    r = call(server.port, "POST", "/v1/messages", {"max_tokens": 8, "messages": user("x"), "output_config": {
        "format": {"type": "json_schema", "schema": {"type": "object", "properties": 3}}}}, headers=AUTH)
    assert "properties" in anthropic_error(r, 400)["message"]


# ------------------------------------------------------------------------------------------ prompts, tokens
def test_count_tokens_and_system_prompts(client):
    def count(messages, **kw) -> int:
        return client.messages.count_tokens(model=MODEL, messages=messages, **kw).input_tokens

    q = user("Say hello")
    assert count(q, tools=[WEATHER]) > count(q)
    assert count(q, tools=[WEATHER, WEB_SEARCH]) == count(q, tools=[WEATHER])  # server tools are left out
    assert count(q, thinking={"type": "disabled"}) > count(q)  # the empty think block
    assert count(q, system="Be brief.") > count(q)
    blocks = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in French."}]
    assert count(q, system=blocks) == count(q, system="Be brief.\n\nAnswer in French.")
    billing = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.100.7b4; cc_entrypoint=cli; "
                                       "cch=eb6c6;"}
    assert count(q, system=[billing, *blocks]) == count(q, system=blocks)
    cached = [{**b, "cache_control": {"type": "ephemeral"}} for b in blocks]  # Anthropic's own: ignored
    assert count(q, system=cached) == count(q, system=blocks)
    # a system message in the middle of the conversation joins the first one
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "A greeting.", "signature": "whatever"}, {"type": "text", "text": "Hi!"}]}]
    late = [*history, {"role": "system", "content": "Answer in French."}, *q]
    assert count(late, system="Be brief.") == count([*history, *q], system=blocks)
    r = client.messages.create(model=MODEL, max_tokens=64, messages=late, system="Be brief.")
    assert r.content[-1].text == "Hello there!"


def test_prefix_cache_usage(client):
    """Claude Code's billing header changes every request; it is dropped, so the rest of the prompt is cached."""
    system = "You are a careful assistant. " * 40

    def ask(cch: str, text: str):
        header = {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.1.abc; cch={cch};"}
        return client.messages.create(model=MODEL, max_tokens=2, system=[header, {"type": "text", "text": system}],
                                      messages=user(text), extra_body={"temperature": 0})

    first, second = ask("aaaa1", "Hi"), ask("bbbb2", "Bye")
    assert first.usage.cache_read_input_tokens == 0
    cached = second.usage.cache_read_input_tokens
    assert cached >= 192 and cached % 64 == 0 and second.usage.input_tokens > 0
    total = client.messages.count_tokens(model=MODEL, system=system, messages=user("Bye")).input_tokens
    assert second.usage.input_tokens + cached == total


# ------------------------------------------------------------------------------------------ auth, errors
def test_auth(server):
    bad = anthropic.Anthropic(base_url=server.base_url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=MODEL, max_tokens=4, messages=user("Hi"))
    bearer = anthropic.Anthropic(base_url=server.base_url, auth_token=KEY, max_retries=0)  # Authorization: Bearer
    assert bearer.messages.create(model=MODEL, max_tokens=2, messages=user("Hi")).usage.output_tokens == 2
    body = {"model": MODEL, "max_tokens": 2, "messages": user("Hi")}
    err = anthropic_error(call(server.port, "POST", "/v1/messages", body), 401)
    assert err["type"] == "authentication_error" and "x-api-key" in err["message"]
    assert anthropic_error(call(server.port, "POST", "/v1/messages/count_tokens", body,
                                headers={"x-api-key": "s3cre"}), 401)["type"] == "authentication_error"
    ok = call(server.port, "POST", "/v1/messages?beta=true", body,
              headers={**AUTH, "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14"})
    assert ok.status == 200 and ok.json()["usage"]["output_tokens"] == 2 and ok.headers["request-id"].startswith("msg_")
    # other routes take x-api-key as well, and still answer in OpenAI's shape
    assert call(server.port, "GET", "/v1/models", headers=AUTH).status == 200
    assert call(server.port, "GET", "/v1/models").error["type"] == "authentication_error"


def test_errors(server, client):
    def err(status: int, body=None, path="/v1/messages", **kw) -> dict:
        return anthropic_error(call(server.port, "POST", path, body, headers=AUTH, **kw), status)

    msgs = user("Hi")
    e = err(400, {"messages": msgs})
    assert e["type"] == "invalid_request_error" and "max_tokens" in e["message"]
    assert err(400, raw=b'{"messages": [')["type"] == "invalid_request_error"
    assert err(400, raw=b"\x87\x00")["type"] == "invalid_request_error"  # not UTF-8
    assert "messages" in err(400, {"max_tokens": 4, "messages": []})["message"]
    assert "temperature" in err(400, {"max_tokens": 4, "messages": msgs, "temperature": -1})["message"]
    assert "stop_sequences" in err(400, {"max_tokens": 4, "messages": msgs, "stop_sequences": ["x"] * 17})["message"]
    assert "messages[0].content[0]" in err(400, {"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]})["message"]
    assert "prefill" in err(400, {"max_tokens": 4, "messages": [*msgs, {"role": "assistant", "content": "Sure"}]})[
        "message"]
    assert "tool_choice" in err(400, {"max_tokens": 4, "messages": msgs, "tool_choice": {"type": "any"}})["message"]
    assert "web_search" in err(400, {"max_tokens": 4, "messages": msgs, "tools": [WEATHER, WEB_SEARCH],
                                     "tool_choice": {"type": "tool", "name": "web_search"}})["message"]
    assert "not in tools" in err(400, {"max_tokens": 4, "messages": msgs, "tools": [WEATHER],
                                       "tool_choice": {"type": "tool", "name": "nope"}})["message"]
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    assert "allow-remote-media" in err(400, {"max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]})["message"]
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    assert err(400, {"max_tokens": 4, "messages": [{"role": "user", "content": [png]}]})
    assert "media_type" in err(400, {"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {**png["source"], "media_type": "image/tiff"}}]}]})["message"]
    assert err(404, {"model": "claude-sonnet-4-5", "max_tokens": 4, "messages": msgs})["type"] == "not_found_error"
    assert err(404, {"model": "claude-sonnet-4-5", "messages": msgs}, path="/v1/messages/count_tokens")[
        "type"] == "not_found_error"
    e = err(413, raw=json.dumps({"max_tokens": 4, "messages": user("x" * (2 << 20))}).encode())
    assert e["type"] == "request_too_large"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=msgs)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=4, messages=msgs, tool_choice={"type": "any"})
    # an engine failure: a 500 in Anthropic's shape, or an error event mid-stream; the server goes on
    assert err(500, {"max_tokens": 4, "messages": user("BOOM")})["type"] == "api_error"
    events = raw_events(server, {"max_tokens": 4, "messages": user("BOOM")})
    assert [n for n, _ in events] == ["message_start", "ping", "error"]
    assert events[-1][1]["error"]["type"] == "api_error"
    with pytest.raises(anthropic.APIStatusError), \
            client.messages.stream(model=MODEL, max_tokens=4, messages=user("BOOM")) as s:
        s.get_final_message()
    assert client.messages.create(model=MODEL, max_tokens=2, messages=msgs).usage.output_tokens == 2
    assert call(server.port, "GET", "/health").status == 200


def test_disconnect_frees_the_request(server):
    port = server.port
    base = get_metrics(port, AUTH)
    aborts = metric(base, "qwen35_requests_total", 'endpoint="messages",finish_reason="abort"')
    body = {"model": MODEL, "max_tokens": 900, "stream": True, "messages": user("Go on forever"),
            "thinking": {"type": "disabled"}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/messages", body=json.dumps(body), headers={"Content-Type": "application/json", **AUTH})
    resp = conn.getresponse()
    assert resp.status == 200
    got = b""
    while got.count(b"\n\n") < 6:  # message_start, ping, a block start and some deltas
        got += resp.read1(4096)
    assert metric(get_metrics(port, AUTH), "qwen35_state_slots_used") == 1
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 20
    while True:
        now = get_metrics(port, AUTH)
        if metric(now, "qwen35_kv_cache_blocks_used") == 0 and metric(now, "qwen35_state_slots_used") == 0 and \
                metric(now, "qwen35_requests_total", 'endpoint="messages",finish_reason="abort"') == aborts + 1:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert metric(now, "qwen35_generation_tokens_total") - metric(base, "qwen35_generation_tokens_total") < 900


def test_openapi_describes_the_routes(server):
    spec = call(server.port, "GET", "/openapi.json", headers=AUTH).json()
    op = spec["paths"]["/v1/messages"]["post"]
    assert {"200", "400", "401", "404"} <= set(op["responses"]) and "422" not in op["responses"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert "/v1/messages/count_tokens" in spec["paths"]
    body = spec["components"]["schemas"]["MessagesRequest"]["properties"]
    assert {"max_tokens", "messages", "system", "tools", "tool_choice", "thinking", "stop_sequences"} <= set(body)


def test_images(tmp_path):
    """Image blocks (base64, and URLs under the media policy), also inside a tool_result, on a model with a
    vision tower: the same prompt as the OpenAI route builds from the same picture."""
    cfg = {"model_type": "qwen3_5", "text_config": dict(TINY, vocab_size=248320), "vision_config": VISION, **IDS}
    (tmp_path / "vl").mkdir()
    (tmp_path / "vl" / "config.json").write_text(json.dumps(cfg))
    llm = qwen35.LLM(qwen35.load_model(tmp_path / "vl", load_format="dummy"), kv_cache_memory_bytes=1 << 25,
                     max_model_len=1024)
    media = tmp_path / "media"
    media.mkdir()
    picture(1).save(media / "one.png")
    with ServerThread(llm, ServerConfig(served_model_name="vl", media=MediaPolicy(local_root=media))) as srv:
        client = anthropic.Anthropic(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)
        url = data_url(picture(0))
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": url.split(",", 1)[1]}}
        question = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]
        count = client.messages.count_tokens(model="vl", messages=question).input_tokens
        r = client.messages.create(model="vl", max_tokens=3, messages=question)
        assert r.usage.input_tokens + r.usage.cache_read_input_tokens == count
        oai = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        ref = oai.chat.completions.create(model="vl", max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}])
        assert count == ref.usage.prompt_tokens > client.messages.count_tokens(
            model="vl", messages=user("What is it?")).input_tokens + 10
        local = {"type": "image", "source": {"type": "url", "url": f"file://{media}/one.png"}}
        assert client.messages.count_tokens(model="vl", messages=[{"role": "user", "content": [local]}]).input_tokens
        in_result = [{"role": "user", "content": "Look"},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "snap",
                                                        "input": {}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                   "content": [{"type": "text", "text": "Here:"}, image]}]}]
        tools = [{"name": "snap", "input_schema": {"type": "object"}}]
        with_image = client.messages.count_tokens(model="vl", messages=in_result, tools=tools).input_tokens
        in_result[2]["content"][0]["content"] = "Here:"
        assert with_image > client.messages.count_tokens(model="vl", messages=in_result, tools=tools).input_tokens + 10
        r = call(srv.port, "POST", "/v1/messages", {"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": f"file://{tmp_path}/../x.png"}}]}]})
        assert anthropic_error(r, 400)["type"] == "invalid_request_error"
