"""A bounded schemathesis run against the server's own /openapi.json: valid and invalid requests generated from
the schema must never get a 5xx, and the server must be healthy (cache back to empty) afterwards.

Bounded for a 2-core machine: a few dozen examples per operation, a 48-token context (so every generation is
short), and `n` / the number of prompts capped in the generated bodies.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from test_server_support import ServerThread, call, get_metrics, make_llm, metric, tiny_model

from qwen35.server import ServerConfig

EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    llm = make_llm(tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny"), max_model_len=48)
    with ServerThread(llm, ServerConfig(served_model_name="tiny-qwen", api_key="k", max_body_bytes=1 << 20)) as srv:
        yield srv


def _bound(case) -> None:
    """Keep generated work small (n <= 2, at most 3 prompts, max_tokens <= 8) and let more requests reach the
    engine (the model name is the one served; the trivial 404 is tested elsewhere)."""
    body = case.body
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = "tiny-qwen"
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 8:
                body[key] = 1 + v % 8
        if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 2:
            body["n"] = 2
        if isinstance(body.get("best_of"), int) and not isinstance(body["best_of"], bool) and body["best_of"] > 2:
            body["best_of"] = 2
        p = body.get("prompt")
        if isinstance(p, list) and p and isinstance(p[0], (list, str)) and len(p) > 3:
            body["prompt"] = p[:3]


@pytest.fixture
def subnormals():
    """Loading a model sets the flush-to-zero flag on this thread (see qwen35.weights.loader); hypothesis refuses
    to generate floats without subnormals. The engine runs in its own thread, with its own flag."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)  # as the loader left it


def test_schemathesis_finds_no_server_error(fuzz_server, subnormals):
    port = fuzz_server.port
    auth = {"Authorization": "Bearer k"}
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", headers=auth)
    base = get_metrics(port, auth)
    t0 = time.monotonic()
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode, examples in EXAMPLES.items():
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                _bound(case)
                response = case.call(base_url=fuzz_server.base_url, headers=auth, timeout=120)
                counts[response.status_code // 100] = counts.get(response.status_code // 100, 0) + 1
                case.validate_response(response, checks=[not_a_server_error])

            try:
                check()
            except Unsatisfiable:  # nothing to get wrong in a request without parameters (GET /health ...)
                assert mode == GenerationMode.NEGATIVE, op.label
    print(f"schemathesis: {sum(counts.values())} requests, by status class {dict(sorted(counts.items()))}, "
          f"{time.monotonic() - t0:.1f}s")
    assert counts.get(2, 0) > 10 and counts.get(4, 0) > 10
    assert counts.get(5, 0) == 0
    # healthy afterwards: answers, and the cache is back to where it was
    assert call(port, "GET", "/health").status == 200
    r = call(port, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3}, headers=auth)
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 3
    deadline = time.monotonic() + 10
    while True:
        now = get_metrics(port, auth)
        if metric(now, "qwen35_kv_cache_blocks_used") == metric(base, "qwen35_kv_cache_blocks_used") == 0 and \
                metric(now, "qwen35_state_slots_used") == 0:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert metric(now, "qwen35_engine_alive") == 1
