"""Model configuration: typed dataclasses read from Hugging Face `config.json`, plus presets.

Accepted `model_type`s: `qwen3_5` / `qwen3_5_moe` (nested `text_config` + `vision_config`) and the
text-only `qwen3_5_text` / `qwen3_5_moe_text`. Keys that would change the maths and that we do not
implement are refused by name; harmless unknown keys are ignored.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

TOP_LEVEL_TYPES = {"qwen3_5": False, "qwen3_5_moe": True}
TEXT_TYPES = {"qwen3_5_text": False, "qwen3_5_moe_text": True}


class ConfigError(ValueError):
    """A config that we cannot run exactly."""


@dataclass
class RopeConfig:
    theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, int, int] = (11, 11, 10)
    mrope_interleaved: bool = True
    rope_type: str = "default"  # "default" or "yarn"
    # YaRN
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass
class TextConfig:
    vocab_size: int = 248320
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 256
    intermediate_size: int = 12288
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    layer_types: list[str] = field(default_factory=list)
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    rope: RopeConfig = field(default_factory=RopeConfig)
    # MoE (num_experts == 0 means dense SwiGLU everywhere)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    mlp_only_layers: list[int] = field(default_factory=list)
    # MTP head
    mtp_num_hidden_layers: int = 0
    eos_token_id: int | list[int] | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def layer_is_moe(self, i: int) -> bool:
        return self.is_moe and i not in self.mlp_only_layers

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.linear_num_value_heads * (
            self.linear_value_head_dim
        )

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries, expected num_hidden_layers="
             f"{self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            need(t in ("linear_attention", "full_attention"),
                 f"layer_types[{i}] = {t!r}: expected 'linear_attention' or 'full_attention'")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size", "linear_num_key_heads", "linear_num_value_heads",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not a multiple of "
             f"num_key_value_heads={self.num_key_value_heads}")
        need(self.linear_num_value_heads % self.linear_num_key_heads == 0,
             f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
             f"linear_num_key_heads={self.linear_num_key_heads}")
        rd = self.rotary_dim
        need(rd % 2 == 0 and 0 < rd <= self.head_dim,
             f"partial_rotary_factor={self.rope.partial_rotary_factor} gives rotary dim {rd}; "
             f"expected an even number in (0, head_dim={self.head_dim}]")
        need(self.rope.rope_type in ("default", "yarn"),
             f"rope_parameters.rope_type={self.rope.rope_type!r} is not supported (expected 'default' or 'yarn')")
        need(self.rope.mrope_interleaved,
             "rope_parameters.mrope_interleaved=false is not supported: Qwen3.5 uses interleaved M-RoPE")
        need(len(self.rope.mrope_section) == 3, "rope_parameters.mrope_section must have 3 entries")
        if self.is_moe:
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive for MoE models")
        if not self.is_moe or self.mlp_only_layers:
            need(self.intermediate_size > 0, "intermediate_size must be positive for dense MLP layers")
        need(self.mtp_num_hidden_layers in (0, 1),
             f"mtp_num_hidden_layers={self.mtp_num_hidden_layers} is not supported (expected 0 or 1)")


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304


@dataclass
class ModelConfig:
    text: TextConfig
    vision: VisionConfig | None = None
    model_type: str = "qwen3_5"
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    quantization: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.text.is_moe

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = copy.deepcopy(d)
        model_type = d.get("model_type")
        if model_type in TOP_LEVEL_TYPES:
            is_moe = TOP_LEVEL_TYPES[model_type]
            text_d = d.get("text_config") or {}
            vision_d = d.get("vision_config")
            top_tie = d.get("tie_word_embeddings")
        elif model_type in TEXT_TYPES:
            is_moe = TEXT_TYPES[model_type]
            text_d, vision_d, top_tie = d, None, None
        else:
            raise ConfigError(
                f"config.json model_type={model_type!r} is not a Qwen3.5 model (expected one of "
                f"{sorted([*TOP_LEVEL_TYPES, *TEXT_TYPES])})")
        text = _text_from_dict(text_d, is_moe)
        # The top-level flag is what transformers' ConditionalGeneration uses to tie the head.
        if top_tie is not None:
            text.tie_word_embeddings = bool(top_tie)
        vision = _vision_from_dict(vision_d) if vision_d is not None else None
        quant = d.get("quantization_config")
        cfg = cls(
            text=text, vision=vision, model_type=model_type,
            image_token_id=d.get("image_token_id", 248056),
            video_token_id=d.get("video_token_id", 248057),
            vision_start_token_id=d.get("vision_start_token_id", 248053),
            vision_end_token_id=d.get("vision_end_token_id", 248054),
            quantization=quant, raw=d,
        )
        if quant is not None and quant.get("quant_method") not in (None, "fp8"):
            raise ConfigError(f"quantization_config.quant_method={quant.get('quant_method')!r} is not supported")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> ModelConfig:
        """A folder holding config.json, or a preset name (see `PRESETS`)."""
        p = Path(name_or_path)
        if p.exists():
            return cls.from_file(p)
        preset = find_preset(str(name_or_path))
        if preset is not None:
            return preset
        raise ConfigError(f"{name_or_path!r} is neither a folder with config.json nor a preset "
                          f"({', '.join(PRESET_NAMES)})")


# Keys that change the computation and that this engine does not implement. Their presence with a
# non-default value is an error naming the key.
_REFUSED_TEXT_KEYS: dict[str, Any] = {
    "attn_output_gate": True,
    "hidden_act": "silu",
    "mtp_use_dedicated_embeddings": False,
    "mamba_ssm_dtype": "float32",
    "sliding_window": None,
    "use_sliding_window": False,
    "decoder_sparse_step": 1,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": None,
}


def _text_from_dict(d: dict[str, Any], is_moe: bool) -> TextConfig:
    for key, ok in _REFUSED_TEXT_KEYS.items():
        if key in d and d[key] != ok and not (key == "num_nextn_predict_layers" and d[key] in (0, 1)):
            raise ConfigError(f"config key {key}={d[key]!r} is not supported (only {ok!r})")
    if d.get("attention_bias"):
        raise ConfigError("config key attention_bias=true is not supported (Qwen3.5 attention has no bias)")
    kw: dict[str, Any] = {}
    for f in fields(TextConfig):
        if f.name in ("rope", "layer_types", "mlp_only_layers"):
            continue
        if f.name in d:
            kw[f.name] = d[f.name]
    t = TextConfig(**kw)
    n = t.num_hidden_layers
    if d.get("layer_types") is not None:
        t.layer_types = list(d["layer_types"])
    else:
        interval = int(d.get("full_attention_interval", 4))
        if interval <= 0:
            raise ConfigError(f"full_attention_interval={interval} must be positive")
        t.layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    t.mlp_only_layers = list(d.get("mlp_only_layers") or [])
    if is_moe:
        t.num_experts = int(d.get("num_experts", 256))
        t.num_experts_per_tok = int(d.get("num_experts_per_tok", 8))
        t.moe_intermediate_size = int(d.get("moe_intermediate_size", 512))
        t.shared_expert_intermediate_size = int(d.get("shared_expert_intermediate_size", 512))
        if "intermediate_size" not in d:
            t.intermediate_size = 0
    else:
        for key in ("num_experts", "num_experts_per_tok"):
            if d.get(key):
                raise ConfigError(f"config key {key}={d[key]} given for a dense model type")
    t.rope = _rope_from_dict(d, t)
    t.validate()
    return t


def _rope_from_dict(d: dict[str, Any], t: TextConfig) -> RopeConfig:
    rp = dict(d.get("rope_parameters") or {})
    # Older configs put these at the top level, or in rope_scaling.
    legacy = d.get("rope_scaling") or {}
    for k, v in legacy.items():
        rp.setdefault(k, v)
    if "rope_theta" in d:
        rp.setdefault("rope_theta", d["rope_theta"])
    if "partial_rotary_factor" in d:
        rp.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    r = RopeConfig(
        theta=float(rp.get("rope_theta", 10000.0)),
        partial_rotary_factor=float(rp.get("partial_rotary_factor", 0.25)),
        mrope_section=tuple(rp.get("mrope_section", (11, 11, 10))),
        mrope_interleaved=bool(rp.get("mrope_interleaved", True)),
        rope_type=rope_type,
    )
    if rope_type == "yarn":
        r.factor = float(rp["factor"])
        r.original_max_position_embeddings = int(
            rp.get("original_max_position_embeddings", t.max_position_embeddings))
        r.beta_fast = float(rp.get("beta_fast", 32.0))
        r.beta_slow = float(rp.get("beta_slow", 1.0))
        r.attention_factor = rp.get("attention_factor")
        r.mscale = rp.get("mscale")
        r.mscale_all_dim = rp.get("mscale_all_dim")
        r.truncate = bool(rp.get("truncate", True))
    elif rope_type not in ("default",):
        raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported (expected 'default' or 'yarn')")
    return r


def _vision_from_dict(d: dict[str, Any]) -> VisionConfig:
    kw = {f.name: d[f.name] for f in fields(VisionConfig) if f.name in d}
    if d.get("deepstack_visual_indexes"):
        raise ConfigError("vision_config.deepstack_visual_indexes is not supported (Qwen3.5 has no deepstack)")
    for k in ("patch_size", "temporal_patch_size"):
        if isinstance(kw.get(k), (list, tuple)):
            kw[k] = int(kw[k][0])
    return VisionConfig(**kw)


# ---------------------------------------------------------------------------------------------- presets
def _preset(hidden: int, layers: int, heads: int, kv: int, v_heads: int, *, ffn: int = 0, experts: int = 0,
            topk: int = 0, expert_ffn: int = 0, shared_ffn: int = 0, tied: bool, vision_hidden: int = 1152,
            vision_depth: int = 27, vision_ffn: int = 4304, vision_heads: int = 16) -> dict[str, Any]:
    moe = experts > 0
    text: dict[str, Any] = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": 256, "linear_num_key_heads": 16,
        "linear_num_value_heads": v_heads, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "vocab_size": 248320,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "tie_word_embeddings": tied,
        "mtp_num_hidden_layers": 1, "eos_token_id": 248044,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    }
    if moe:
        text.update(num_experts=experts, num_experts_per_tok=topk, moe_intermediate_size=expert_ffn,
                    shared_expert_intermediate_size=shared_ffn)
    else:
        text["intermediate_size"] = ffn
    return {
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "tie_word_embeddings": tied,
        "text_config": text,
        "vision_config": {"depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": vision_ffn,
                          "num_heads": vision_heads, "out_hidden_size": hidden, "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304},
    }


# The eight official sizes (../shared/FACTS.md; the 397B and 0.8B rows are verbatim configs).
PRESET_DICTS: dict[str, dict[str, Any]] = {
    "Qwen3.5-397B-A17B": _preset(4096, 60, 32, 2, 64, experts=512, topk=10, expert_ffn=1024, shared_ffn=1024,
                                 tied=False),
    "Qwen3.5-122B-A10B": _preset(3072, 48, 32, 2, 64, experts=256, topk=8, expert_ffn=1024, shared_ffn=1024,
                                 tied=False),
    "Qwen3.5-35B-A3B": _preset(2048, 40, 16, 2, 32, experts=256, topk=8, expert_ffn=512, shared_ffn=512,
                               tied=False),
    "Qwen3.5-27B": _preset(5120, 64, 24, 4, 48, ffn=17408, tied=False),
    "Qwen3.5-9B": _preset(4096, 32, 16, 4, 32, ffn=12288, tied=False),
    "Qwen3.5-4B": _preset(2560, 32, 16, 4, 32, ffn=9216, tied=True, vision_hidden=1024, vision_depth=24,
                          vision_ffn=4096),
    "Qwen3.5-2B": _preset(2048, 24, 8, 2, 16, ffn=6144, tied=True, vision_hidden=1024, vision_depth=24,
                          vision_ffn=4096),
    "Qwen3.5-0.8B": _preset(1024, 24, 8, 2, 16, ffn=3584, tied=True, vision_hidden=768, vision_depth=12,
                            vision_ffn=3072, vision_heads=12),
}
PRESET_NAMES = list(PRESET_DICTS)


def find_preset(name: str) -> ModelConfig | None:
    """`Qwen3.5-0.8B`, `Qwen/Qwen3.5-0.8B`, case-insensitive; `-FP8` / `-Base` suffixes map to the same shape."""
    key = name.split("/")[-1].lower()
    for suffix in ("-fp8", "-base"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    for pname, d in PRESET_DICTS.items():
        if pname.lower() == key:
            return ModelConfig.from_dict(d)
    return None


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "RopeConfig", "ConfigError", "PRESET_NAMES",
           "find_preset", "ceil_div"]
