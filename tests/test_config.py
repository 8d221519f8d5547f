"""Config reading, presets, refused keys; `qwen35 info` figures."""

from __future__ import annotations

import json

import pytest

from qwen35.cli import main
from qwen35.config import PRESET_NAMES, ConfigError, ModelConfig, find_preset
from qwen35.model_info import full_attention_twin, model_info


def test_reference_configs_read(reference_dir):
    big = ModelConfig.from_file(reference_dir / "Qwen3.5-397B-A17B-FP8")
    t = big.text
    assert big.is_moe and t.num_experts == 512 and t.num_experts_per_tok == 10
    assert len(t.linear_layers) == 45 and len(t.attention_layers) == 15
    assert t.rope.theta == 1e7 and t.rotary_dim == 64 and t.rope.mrope_section == (11, 11, 10)
    assert big.quantization["quant_method"] == "fp8" and big.vision.depth == 27
    small = ModelConfig.from_file(reference_dir / "Qwen3.5-0.8B")
    assert not small.is_moe and small.text.tie_word_embeddings and small.text.intermediate_size == 3584


def test_presets_match_the_reference_configs(reference_dir):
    for name, folder in (("Qwen3.5-397B-A17B", "Qwen3.5-397B-A17B-FP8"), ("Qwen3.5-0.8B", "Qwen3.5-0.8B")):
        preset, ref = find_preset(name), ModelConfig.from_file(reference_dir / folder)
        assert preset.text == ref.text, name
        assert preset.vision == ref.vision, name


def test_all_presets_build_on_meta():
    assert len(PRESET_NAMES) == 8
    for name in PRESET_NAMES:
        info = model_info(find_preset(name))
        assert info.params_total > 0.5e9
    assert find_preset("Qwen/Qwen3.5-35B-A3B-FP8").is_moe
    assert find_preset("Qwen3.5-9B-Base").text.hidden_size == 4096


def test_layer_types_explicit_or_by_interval():
    base = {"model_type": "qwen3_5_text", "num_hidden_layers": 6}
    c = ModelConfig.from_dict({**base, "full_attention_interval": 3})
    assert c.text.layer_types == ["linear_attention", "linear_attention", "full_attention"] * 2
    irregular = ["full_attention", "linear_attention", "full_attention", "full_attention", "linear_attention",
                 "linear_attention"]
    assert ModelConfig.from_dict({**base, "layer_types": irregular}).text.layer_types == irregular


@pytest.mark.parametrize("key,value,match", [
    ("hidden_act", "gelu", "hidden_act"),
    ("attn_output_gate", False, "attn_output_gate"),
    ("attention_bias", True, "attention_bias"),
    ("mamba_ssm_dtype", "bfloat16", "mamba_ssm_dtype"),
    ("layer_types", ["linear_attention", "sliding_attention"], r"layer_types\[1\]"),
    ("layer_types", ["linear_attention"], "layer_types has 1 entries"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("linear_num_value_heads", 5, "linear_num_value_heads"),
    ("rope_parameters", {"rope_type": "longrope"}, "rope_type"),
    ("mtp_num_hidden_layers", 2, "mtp_num_hidden_layers"),
])
def test_unsupported_keys_are_refused_by_name(key, value, match):
    d = {"model_type": "qwen3_5_text", "num_hidden_layers": 2, "num_attention_heads": 4, key: value}
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(d)


def test_harmless_unknown_keys_are_ignored():
    c = ModelConfig.from_dict({"model_type": "qwen3_5_text", "num_hidden_layers": 4, "some_future_flag": 1,
                               "initializer_range": 0.5, "use_cache": False})
    assert c.text.num_hidden_layers == 4


def test_yarn_is_read():
    c = ModelConfig.from_dict({"model_type": "qwen3_5_text", "num_hidden_layers": 4, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144, "rope_theta": 1e7,
        "partial_rotary_factor": 0.25}})
    assert c.text.rope.rope_type == "yarn" and c.text.rope.factor == 4.0


def test_info_figures_for_397b(reference_dir):
    cfg = ModelConfig.from_file(reference_dir / "Qwen3.5-397B-A17B-FP8")
    info = model_info(cfg, context=262144)
    assert 396.5e9 < info.params_total < 397.0e9
    assert 16.5e9 < info.params_active < 17.5e9
    assert info.kv_bytes_per_token == 30720
    assert round(info.kv_bytes_per_token * 262144 / 2**30, 2) == 7.5
    # 180 MiB fp32 state + 3.2 MiB conv window (FACTS.md)
    assert 45 * 64 * 128 * 128 * 4 + 45 * 12288 * 3 * 2 == info.state_bytes_per_sequence
    twin = model_info(full_attention_twin(cfg), context=262144)
    assert twin.kv_bytes_per_token == 4 * 30720 and twin.state_bytes_per_sequence == 0


def test_info_cli_on_reference_and_preset(reference_dir, capsys):
    assert main(["info", str(reference_dir / "Qwen3.5-397B-A17B-FP8"), "--json"]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main(["info", "Qwen3.5-397B-A17B", "--json", "--context", "32768", "--batch", "2"]) == 0
    from_preset = json.loads(capsys.readouterr().out)
    assert from_folder["params_total"] == from_preset["params_total"]
    assert from_preset["kv_bytes_per_token"] == 30720
    assert from_preset["cache_bytes"] == 2 * (32768 * 30720 + from_preset["state_bytes_per_sequence"])
    assert main(["info", "Qwen3.5-0.8B"]) == 0
    text = capsys.readouterr().out
    assert "kv_bytes_per_token (bf16)" in text and "12,288" in text
    assert main(["info", "no-such-model"]) == 2
    assert "error" in capsys.readouterr().err
