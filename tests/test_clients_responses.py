"""`/v1/responses` driven by the clients that speak it: the `openai` SDK (responses.create plain and streamed,
responses.stream, retrieve, delete), the OpenAI Agents SDK (an agent with a function tool through
OpenAIResponsesModel and through OpenAIChatCompletionsModel), and LangChain's ChatOpenAI (bind_tools and
with_structured_output, over chat completions and over the Responses API). A real uvicorn server on loopback, a
tiny random model with the real vocabulary; where a test needs particular output (a tool call, an answer that
shows what the prompt held), a scripted sampler (tests/test_server_support.py) replaces the sampled tokens of
the prompts it recognises, everything else staying real. Raw answers are validated against the openai SDK's own
pydantic types, strictly, so a shape the SDK would only half-parse fails here.
"""

from __future__ import annotations

import asyncio
import json
import re

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
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

from qwen35.server import ServerConfig
from qwen35.server.responses import ResponseStore, items_to_messages
from qwen35.server.responses_protocol import ResponsesRequest

MODEL = "tiny-qwen"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather forecast for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL_ARGS = "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
STREAM_EVENTS = TypeAdapter(ResponseStreamEvent)


def _answer(prompt: str, reasoning: str, text: str) -> str:
    """`text`, after `reasoning` when the prompt left a think block open."""
    return f"{reasoning}\n</think>\n\n{text}" if prompt.endswith("<think>\n") else text


def forced_call(prompt: str, user: str) -> bool:
    """The server closed the think block of a prompt listing tools: tool_choice required or named."""
    return prompt.endswith("</think>\n\n") and "<tools>" in prompt and "<tool_response>" not in user \
        and "weather" in user.lower()


def script(prompt: str) -> str | None:
    user = last_user_message(prompt)
    if forced_call(prompt, user):  # tool_choice required / named: the grammar allows only a call
        names = re.findall(r'"name": "([^"]+)"', prompt.split("</tools>")[0])
        name = "get_weather" if "get_weather" in names else names[0]
        return f"<tool_call>\n<function={name}>\n" + CALL_ARGS
    if "<tool_response>" in user:
        result = user.split("<tool_response>")[1].split("</tool_response>")[0].strip()
        return _answer(prompt, "The tool answered.", f"Tool says: {result}")
    if "Say hello" in user:
        return _answer(prompt, "The user greets me.", "Hello there!")
    if "What did I say first" in user:
        return _answer(prompt, "Look back.", "You said hello." if "Say hello" in prompt else "I do not know.")
    if "Who are you" in user:
        return "I am a pirate." if "You are a pirate" in prompt.split("<|im_start|>user")[0] else "An assistant."
    if "Think long" in user:
        return " ".join(f"step{i}" for i in range(12)) + "\n</think>\n\nDone."
    return None


def fail_mid_stream(llm) -> None:
    """A step that raises once a "BOOM" prompt has 3 output tokens: an engine failure mid-stream."""
    scripted_run, tok = llm.engine.runner.run, llm.tokenizer

    def run(work, plan):
        for seq in work.seqs:
            if len(seq.token_ids) - seq.num_prompt_tokens >= 3 and "BOOM" in tok.decode(
                    seq.token_ids[:seq.num_prompt_tokens]):
                raise RuntimeError("injected failure")
        return scripted_run(work, plan)

    llm.engine.runner.run = run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    llm = make_llm(tiny_model(tmp_path_factory.mktemp("responses") / "tiny"))
    install_scripts(llm, [script])
    fail_mid_stream(llm)
    with ServerThread(llm, ServerConfig(served_model_name=MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def route_hits(server, route: str) -> float:
    """POSTs answered 200 on `route` so far (the server's own HTTP metrics)."""
    return metric(get_metrics(server.port), "qwen35_http_requests_total",
                  f'method="POST",route="{route}",status="200"')


def raw_create(server, body: dict) -> dict:
    r = call(server.port, "POST", "/v1/responses", {"model": MODEL, **body})
    assert r.status == 200, r.body
    data = r.json()
    Response.model_validate(data, strict=False)  # the SDK's own types, validated (not just constructed)
    return data


def raw_stream(server, body: dict) -> list[dict]:
    """The events of a streamed response, each validated as the SDK's stream event type."""
    r = call(server.port, "POST", "/v1/responses", {"model": MODEL, **body, "stream": True})
    assert r.status == 200, r.body
    assert r.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in r.body.decode().split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        ev = json.loads(data[len("data: "):])
        assert ev["type"] == name[len("event: "):]
        STREAM_EVENTS.validate_python(ev)
        events.append(ev)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# ------------------------------------------------------------------------------------------ openai SDK
def test_plain_response_with_reasoning(server, client):
    raw = raw_create(server, {"input": "Say hello", "max_output_tokens": 40})
    assert raw["status"] == "completed" and raw["incomplete_details"] is None
    kinds = [item["type"] for item in raw["output"]]
    assert kinds == ["reasoning", "message"]
    assert raw["output"][0]["content"] == [{"type": "reasoning_text", "text": "The user greets me."}]
    assert raw["output"][1]["content"][0]["text"] == "Hello there!"
    usage = raw["usage"]
    assert usage["input_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert 0 < usage["output_tokens_details"]["reasoning_tokens"] < usage["output_tokens"]

    resp = client.responses.create(model=MODEL, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Say hello"}]}], max_output_tokens=40)
    assert resp.output_text == "Hello there!" and resp.id.startswith("resp_")
    assert resp.output[0].type == "reasoning" and resp.output[0].content[0].text == "The user greets me."


def test_reasoning_effort_none_and_instructions(client):
    resp = client.responses.create(model=MODEL, input="Say hello", reasoning={"effort": "none"},
                                   max_output_tokens=40)
    assert [o.type for o in resp.output] == ["message"] and resp.output_text == "Hello there!"
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    assert resp.reasoning.effort == "none"
    # instructions: a system message before the input
    resp = client.responses.create(model=MODEL, input="Who are you?", instructions="You are a pirate.",
                                   reasoning={"effort": "none"}, max_output_tokens=20)
    assert resp.output_text == "I am a pirate." and resp.instructions == "You are a pirate."
    resp = client.responses.create(model=MODEL, input=[{"role": "developer", "content": "You are a pirate."},
                                                       {"role": "user", "content": "Who are you?"}],
                                   reasoning={"effort": "none"}, max_output_tokens=20)
    assert resp.output_text == "I am a pirate."


def test_incomplete_at_max_output_tokens(server):
    raw = raw_create(server, {"input": "Tell me a long story", "max_output_tokens": 3})
    assert raw["status"] == "incomplete" and raw["incomplete_details"] == {"reason": "max_output_tokens"}
    assert raw["usage"]["output_tokens"] == 3
    assert raw["output"] and raw["output"][-1]["status"] == "incomplete"
    events = raw_stream(server, {"input": "Tell me a long story", "max_output_tokens": 3})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_function_tools_required_and_auto(client):
    tools = [WEATHER, {"type": "web_search"}, {"type": "namespace", "name": "crm", "description": "x", "tools": []}]
    resp = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=tools,
                                   tool_choice="required", max_output_tokens=40)
    assert resp.status == "completed"
    calls = [o for o in resp.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].call_id and calls[0].id.startswith("fc_") and calls[0].status == "completed"
    assert [t.type for t in resp.tools] == ["function"]  # the ignored tool types are not echoed as available
    # named function
    resp = client.responses.create(model=MODEL, input="Weather?", tools=[WEATHER],
                                   tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40)
    assert [o.name for o in resp.output if o.type == "function_call"] == ["get_weather"]
    # the tool's result goes back as a function_call_output item (stateless, as Codex sends it)
    follow = client.responses.create(model=MODEL, tools=[WEATHER], max_output_tokens=60, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
         "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21C"}])
    assert follow.output_text == "Tool says: sunny, 21C"
    assert follow.output[0].type == "reasoning"


def test_tool_choice_errors(server):
    r = call(server.port, "POST", "/v1/responses", {"input": "x", "tools": [{"type": "web_search"}],
                                                    "tool_choice": {"type": "web_search_preview"}})
    assert r.status == 400 and r.error["param"] == "tool_choice"
    r = call(server.port, "POST", "/v1/responses", {"input": "x", "tool_choice": "required"})
    assert r.status == 400 and r.error["param"] == "tool_choice"
    r = call(server.port, "POST", "/v1/responses", {"input": "x", "tools": [WEATHER],
                                                    "tool_choice": {"type": "function", "name": "nope"}})
    assert r.status == 400 and "nope" in r.error["message"]
    # only hosted tools and tool_choice auto: an ordinary answer, not a 400
    raw = raw_create(server, {"input": "Say hello", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}],
                              "tool_choice": "auto", "max_output_tokens": 40})
    assert raw["output"][-1]["content"][0]["text"] == "Hello there!"


def test_streamed_events_in_order(server, client):
    events = raw_stream(server, {"input": "Say hello", "max_output_tokens": 40})
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    reasoning = [e for e in events if e["type"] == "response.reasoning_text.delta"]
    text = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(e["delta"] for e in reasoning) == "The user greets me."
    assert "".join(e["delta"] for e in text) == "Hello there!"
    # each item: added, its part added, deltas, done, part done, item done; reasoning before the message
    want = ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
            "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
            "response.output_item.added", "response.content_part.added", "response.output_text.delta",
            "response.output_text.done", "response.content_part.done", "response.output_item.done"]
    squeezed = [t for i, t in enumerate(types[2:-1]) if not (t.endswith(".delta") and types[2 + i - 1] == t)]
    assert squeezed == want
    final = events[-1]["response"]
    assert [o["id"] for o in final["output"]] == [e["item"]["id"] for e in events
                                                  if e["type"] == "response.output_item.done"]
    assert final["output"][1]["content"][0]["text"] == "Hello there!"
    assert final["usage"]["output_tokens"] > 0

    # the SDK: the raw event stream, and the helper that rebuilds the response from the events
    seen = [e.type for e in client.responses.create(model=MODEL, input="Say hello", max_output_tokens=40,
                                                    stream=True)]
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    with client.responses.stream(model=MODEL, input="Say hello", max_output_tokens=40) as stream:
        for _ in stream:
            pass
        resp = stream.get_final_response()
    assert resp.output_text == "Hello there!"


def test_streamed_function_call(server):
    events = raw_stream(server, {"input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "required",
                                 "max_output_tokens": 40})
    types = [e["type"] for e in events]
    assert types[2:-1] == ["response.output_item.added", "response.function_call_arguments.delta",
                           "response.function_call_arguments.done", "response.output_item.done"]
    done = events[-2]["item"]
    assert done["type"] == "function_call" and done["name"] == "get_weather"
    assert json.loads(done["arguments"]) == {"city": "Paris"} and events[4]["arguments"] == done["arguments"]
    assert events[-1]["response"]["output"] == [done]


def test_reasoning_effort_budgets(server, client, monkeypatch):
    from qwen35.server import responses

    tok = server.serving.tokenizer
    script_ids = tok.encode(script("<|im_start|>user\nThink long<|im_end|>\n"))
    unlimited = client.responses.create(model=MODEL, input="Think long", reasoning={"effort": "high"},
                                        max_output_tokens=150)
    assert unlimited.output[0].content[0].text.endswith("step11") and unlimited.output_text == "Done."
    monkeypatch.setitem(responses.EFFORT_BUDGETS, "low", 3)
    low = client.responses.create(model=MODEL, input="Think long", reasoning={"effort": "low"},
                                  max_output_tokens=150)
    assert low.output[0].content[0].text == tok.decode(script_ids[:3]).strip()
    assert low.output_text and low.status == "completed"
    # thinking_budget (vLLM-style extra) wins over the effort
    two = client.responses.create(model=MODEL, input="Think long", reasoning={"effort": "high"},
                                  max_output_tokens=150, extra_body={"thinking_budget": 2})
    assert two.output[0].content[0].text == tok.decode(script_ids[:2]).strip()


def test_engine_failure_mid_stream(server):
    r = call(server.port, "POST", "/v1/responses", {"input": "BOOM", "max_output_tokens": 20})
    assert r.status == 500 and r.error["type"] == "server_error"
    events = raw_stream(server, {"input": "BOOM", "max_output_tokens": 20})
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-2:] == ["error", "response.failed"]
    assert any(t == "response.reasoning_text.delta" for t in types)  # it failed after some output
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "injected failure" in events[-2]["message"]
    # the server goes on
    assert raw_create(server, {"input": "Say hello", "max_output_tokens": 40})["status"] == "completed"


def test_text_format_json_schema(server, client):
    """text.format json_schema: the answer after the reasoning follows the schema (where structured output is
    built: qwen35.engine.structured); otherwise a 400 naming text.format."""
    from pydantic import BaseModel, ConfigDict, Field

    class City(BaseModel):  # bounded, so that random weights finish it within max_output_tokens
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=8)
        population: int = Field(ge=0, le=1000)

    fmt = {"type": "json_schema", "name": "city", "schema": City.model_json_schema(), "strict": True}
    try:
        import qwen35.engine.structured  # noqa: F401
    except ImportError:
        r = call(server.port, "POST", "/v1/responses", {"input": "A city?", "text": {"format": fmt}})
        assert r.status == 400 and r.error["param"] == "text.format"
        return
    raw = raw_create(server, {"input": "A city?", "text": {"format": fmt}, "max_output_tokens": 200,
                              "reasoning": {"effort": "none"}})
    assert raw["status"] == "completed" and raw["text"]["format"]["name"] == "city"
    City.model_validate_json(raw["output"][-1]["content"][0]["text"])
    # thinking on (cut by a budget, the weights are random): reasoning first, then the JSON
    thought = raw_create(server, {"input": "A city?", "text": {"format": fmt}, "max_output_tokens": 200,
                                  "thinking_budget": 5})
    assert [o["type"] for o in thought["output"]] == ["reasoning", "message"]
    City.model_validate_json(thought["output"][-1]["content"][0]["text"])
    parsed = client.responses.parse(model=MODEL, input="A city?", text_format=City, max_output_tokens=200,
                                    reasoning={"effort": "none"})
    assert isinstance(parsed.output_parsed, City)
    r = call(server.port, "POST", "/v1/responses", {"input": "A city?", "text": {"format": {
        "type": "json_schema", "name": "bad", "schema": {"type": "nonsense"}}}})
    assert r.status == 400 and "nonsense" in r.error["message"]


def test_store_and_previous_response_id(server, client):
    first = client.responses.create(model=MODEL, input="Say hello", max_output_tokens=40)
    second = client.responses.create(model=MODEL, input="What did I say first?", previous_response_id=first.id,
                                     max_output_tokens=40)
    assert second.output_text == "You said hello." and second.previous_response_id == first.id
    # without the chain the model does not know
    alone = client.responses.create(model=MODEL, input="What did I say first?", max_output_tokens=40)
    assert alone.output_text == "I do not know."
    # stateless: the earlier output items sent back as input (the SDK's own objects), as the Agents SDK does
    again = client.responses.create(model=MODEL, store=False, max_output_tokens=40, input=[
        {"role": "user", "content": "Say hello"}, *first.output, {"role": "user", "content": "What did I say first?"}])
    assert again.output_text == "You said hello."
    # a streamed response is stored too, and a chain goes on from it
    with client.responses.stream(model=MODEL, input="What did I say first?", previous_response_id=second.id,
                                 max_output_tokens=40) as stream:
        third = stream.get_final_response()
    assert third.output_text == "You said hello."
    assert client.responses.retrieve(third.id).output_text == "You said hello."
    # store: false is not kept
    loose = client.responses.create(model=MODEL, input="Say hello", store=False, max_output_tokens=40)
    r = call(server.port, "POST", "/v1/responses", {"input": "What did I say first?",
                                                    "previous_response_id": loose.id})
    assert r.status == 404 and r.error["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(loose.id)
    # deleted
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="again", previous_response_id=first.id)
    # the rest of the chain still holds its whole conversation
    assert client.responses.create(model=MODEL, input="What did I say first?", previous_response_id=second.id,
                                   max_output_tokens=40).output_text == "You said hello."


def test_truncation_auto_drops_the_oldest_turns(server):
    filler = " ".join(f"word{i}" for i in range(60))  # 170 tokens a message; the context is 1024
    items = []
    for _ in range(3):
        items += [{"role": "user", "content": filler}, {"role": "assistant", "content": filler}]
    body = {"input": [*items, {"role": "user", "content": "Who are you?"}], "instructions": "You are a pirate.",
            "max_output_tokens": 20, "reasoning": {"effort": "none"}}
    r = call(server.port, "POST", "/v1/responses", body)
    assert r.status == 400 and r.error["code"] == "context_length_exceeded" and r.error["param"] == "input"
    raw = raw_create(server, {**body, "truncation": "auto"})
    assert raw["truncation"] == "auto" and raw["output"][-1]["content"][0]["text"] == "I am a pirate."
    assert 600 < raw["usage"]["input_tokens"] <= 1024 - 20  # the oldest of the three old turns dropped, no more
    # nothing to drop: the last turn alone is too long
    r = call(server.port, "POST", "/v1/responses", {"input": filler * 8, "truncation": "auto"})
    assert r.status == 400 and r.error["code"] == "context_length_exceeded"


def test_bad_requests_name_the_field(server):
    cases = [({"input": [{"type": "computer_call", "id": "x"}]}, "input[0]"),
             ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
              "input[0].content[0]"),
             ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
              "input[0].content[0]"),
             ({"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
              "input[0].content[0]"),
             ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
             ({"input": "x", "temperature": -1}, "temperature"),
             ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
             ({"input": "x", "background": True}, "background"),
             ({"input": []}, "input"),
             ({"input": "x", "max_output_tokens": 5000}, "max_output_tokens"),
             ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "not json"}]},
              "input"),
             ({"input": "x", "tools": [WEATHER, WEATHER]}, "tools[1].name")]
    for body, param in cases:
        r = call(server.port, "POST", "/v1/responses", body)
        assert r.status == 400, (body, r.body)
        assert r.error["param"] == param, (body, r.error)
    r = call(server.port, "POST", "/v1/responses", {"model": "other", "input": "x"})
    assert r.status == 404 and r.error["param"] == "model"
    r = call(server.port, "GET", "/v1/responses/resp_nope")
    assert r.status == 404 and r.error["code"] == "not_found"
    # the server is fine afterwards
    assert raw_create(server, {"input": "Say hello", "max_output_tokens": 40})["status"] == "completed"


def test_openapi_describes_the_routes(server):
    r = call(server.port, "GET", "/openapi.json")
    assert r.status == 200
    paths = r.json()["paths"]
    assert "post" in paths["/v1/responses"] and {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])
    assert "422" not in paths["/v1/responses"]["post"]["responses"]


def test_image_input_on_a_text_model(server):
    """input_image parts reach the media checks: this tiny model has no vision encoder -> 400."""
    r = call(server.port, "POST", "/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}]})
    assert r.status == 400 and r.error["code"] == "images_not_supported" and r.error["param"] == "input"


# ------------------------------------------------------------------------------------------ translation units
def test_items_to_messages_groups_assistant_turns():
    req = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "q1"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "short"}],
         "content": [{"type": "reasoning_text", "text": "think 1"}]},
        {"type": "message", "role": "assistant", "id": "m1", "status": "completed",
         "content": [{"type": "output_text", "text": "I will look.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "only a summary"}]},
        {"role": "assistant", "content": "done"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "dropped"}]},
        {"role": "developer", "content": "be nice"}]})
    msgs = items_to_messages(req.input)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool", "assistant", "system"]
    first = msgs[1]
    assert first["reasoning_content"] == "think 1" and first["content"] == "I will look."
    assert [c["id"] for c in first["tool_calls"]] == ["c1", "c2"]
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1", "content": "one"}
    assert msgs[3]["content"] == [{"type": "text", "text": "two"}]
    assert msgs[4] == {"role": "assistant", "content": "done", "reasoning_content": "only a summary"}
    assert msgs[5] == {"role": "system", "content": "be nice"}


def test_store_is_bounded():
    from qwen35.server.responses import StoredResponse

    store = ResponseStore(max_responses=3, max_bytes=1000)
    for i in range(5):
        store.put(f"r{i}", StoredResponse({}, [], 10))
    assert len(store) == 3 and store.get("r0") is None and store.get("r4") is not None
    store.get("r2")  # used: now the newest
    store.put("big", StoredResponse({}, [], 900))
    assert store.get("r2") is not None and store.get("r3") is None and store.nbytes <= 1000
    store.put("huge", StoredResponse({}, [], 5000))  # larger than the cap: nothing is kept
    assert len(store) == 0 and store.nbytes == 0


# ------------------------------------------------------------------------------------------ OpenAI Agents SDK
def _agent_run(server, use_responses: bool) -> tuple[object, list[str]]:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Weather forecast for a city."""
        asked.append(city)
        return f"sunny in {city}"

    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        model = OpenAIResponsesModel(MODEL, client) if use_responses else OpenAIChatCompletionsModel(MODEL, client)
        agent = Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model,
                      model_settings=ModelSettings(tool_choice="required", max_tokens=60))
        try:
            return await Runner.run(agent, "What is the weather in Paris?", max_turns=3)
        finally:
            await client.close()

    return asyncio.run(run()), asked


@pytest.mark.parametrize("use_responses", [True, False], ids=["responses", "chat_completions"])
def test_agents_sdk_function_tool(server, use_responses):
    route = "/v1/responses" if use_responses else "/v1/chat/completions"
    before = route_hits(server, route)
    result, asked = _agent_run(server, use_responses)
    assert asked == ["Paris"]  # the forced call ran the tool once; then tool_choice resets to auto
    assert result.final_output == "Tool says: sunny in Paris"
    assert route_hits(server, route) == before + 2  # the call, then the answer to the tool's result


# ------------------------------------------------------------------------------------------ LangChain
@pytest.mark.parametrize("use_responses_api", [False, True], ids=["chat_completions", "responses"])
def test_langchain_bind_tools_and_structured_output(server, use_responses_api):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str) -> str:
        """Weather forecast for a city."""
        return "sunny"

    route = "/v1/responses" if use_responses_api else "/v1/chat/completions"
    before = route_hits(server, route)
    llm = ChatOpenAI(model=MODEL, base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120,
                     max_tokens=60, use_responses_api=use_responses_api)
    msg = llm.bind_tools([get_weather], tool_choice="required").invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert not msg.content or "<tool_call>" not in str(msg.content)

    class Weather(BaseModel):
        """The city to get the weather of."""

        city: str

    got = llm.with_structured_output(Weather, method="function_calling").invoke("What is the weather in Paris?")
    assert got == Weather(city="Paris")
    assert route_hits(server, route) == before + 2

    # the default method: a strict json_schema response format (the weights are random: bounded, no thinking)
    class Short(BaseModel):
        word: str = Field(max_length=6)
        count: int = Field(ge=0, le=99)

    plain = ChatOpenAI(model=MODEL, base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120,
                       max_tokens=60, use_responses_api=use_responses_api, reasoning_effort="none")
    got = plain.with_structured_output(Short).invoke("Any word?")
    assert isinstance(got, Short) and len(got.word) <= 6
    assert route_hits(server, route) == before + 3
