"""SamplingParams: vLLM names, validation naming the field, defaults from generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen35 import SamplingParams
from qwen35.engine.sampling import RequestOutputKind, eos_ids_from_generation_config, load_generation_config

REFERENCE = Path("/work/shared/reference/Qwen3.5-397B-A17B-FP8")


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids, p.ignore_eos) == (16, 0, [], [], False)
    assert p.logprobs is None and p.seed is None and p.skip_special_tokens
    assert p.output_kind == RequestOutputKind.CUMULATIVE


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.1),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("max_tokens", 0),
    ("min_tokens", -1), ("logprobs", -1), ("seed", 1.5), ("stop", [""]), ("stop_token_ids", [-1]),
    ("thinking_budget", -1), ("temperature", float("nan")), ("n", True), ("output_kind", "sideways"),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1, temperature=0.0, top_p=0.5, output_kind="delta")
    assert p.stop == ["###"] and p.top_k == 0 and p.greedy
    assert p.top_p == 1.0  # greedy: truncation is irrelevant and reset
    assert p.output_kind == RequestOutputKind.DELTA
    assert SamplingParams(max_thinking_tokens=7).thinking_budget == 7
    with pytest.raises(ValueError, match="thinking_budget"):
        SamplingParams(thinking_budget=3, max_thinking_tokens=4)
    q = SamplingParams(temperature=0.7, seed=3).clone(max_tokens=5)
    assert (q.temperature, q.seed, q.max_tokens) == (0.7, 3, 5)


def test_generation_config_defaults(tmp_path):
    gen = load_generation_config(REFERENCE)
    p = SamplingParams.from_generation_config(gen)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 20)
    assert eos_ids_from_generation_config(gen) == (248046, 248044)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 7}))
    p = SamplingParams.from_generation_config(tmp_path, max_tokens=3)
    assert p.greedy and p.max_tokens == 3
    assert eos_ids_from_generation_config(load_generation_config(tmp_path)) == (7,)
    assert load_generation_config(tmp_path / "nowhere") == {}
