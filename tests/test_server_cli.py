"""`qwen35 serve` as a real process: startup, the API key, and a graceful shutdown that lets a running stream
finish (SIGTERM while streaming: the stream still completes, then the process exits)."""

from __future__ import annotations

import http.client
import json
import signal

import openai
import pytest
import test_engine_support  # noqa: F401
from test_server_support import call, sse_events, start_serve_process, stop_serve_process


@pytest.fixture
def served(tmp_path):
    proc, port, log = start_serve_process(tmp_path, "--api-key", "s3cret", "--max-model-len", "1024")
    try:
        yield proc, port
    finally:
        stop_serve_process(proc, log)


def test_serve_auth_and_graceful_shutdown(served):
    proc, port = served
    # the key: none and wrong get 401 (OpenAI's error shape), the right one 200; /health needs none
    assert call(port, "GET", "/v1/models").status == 401
    assert call(port, "GET", "/v1/models", headers={"Authorization": "Bearer nope"}).error["code"] == \
        "invalid_api_key"
    assert call(port, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"}).status == 200
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0).models.list()

    # SIGTERM during a stream: the stream runs to its end, then the server exits
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
    resp = conn.getresponse()
    assert resp.status == 200
    got = resp.read1(65536)
    proc.send_signal(signal.SIGTERM)
    rest = resp.read()
    conn.close()
    events = sse_events(got + rest)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status says SIGTERM
    assert proc.wait(60) in (0, -signal.SIGTERM)
