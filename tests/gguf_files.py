"""GGUF files for tests, written with `gguf`'s writer in the layout llama.cpp's converter gives Qwen3.5
(`conversion/qwen.py`; FACTS.md "GGUF"): names, the +1 on zero-centred norms, ssm_a = -exp(A_log), the tiled
value-head order, the squeezed conv, split experts, the MTP layer as block n_layer with `nextn.*` tensors.

Written independently of `qwen35.weights.gguf` (from the facts, not by calling its helpers). Tensor types are
chosen per tensor: F32, gguf's own quantizers (Q8_0, Q4_0, ...), or for the K-quants, which gguf cannot make,
random valid blocks scaled like the weights (the test's oracle is then the same file widened exactly).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import qwen35

# Shapes that every block type divides (K a multiple of 256 where K-quants go), key heads != value heads.
QUANT_TEXT = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=64, linear_key_head_dim=32, linear_value_head_dim=64, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, mtp_num_hidden_layers=1,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25,
                                       mrope_section=[3, 3, 2], mrope_interleaved=True))
QUANT_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256)

_LEAF = {  # our name inside a layer -> GGUF leaf
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight", "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight", "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight", "linear_attn.A_log": "ssm_a",
    "linear_attn.dt_bias": "ssm_dt.bias", "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
_MTP_LEAF = {"mtp.fc.weight": "nextn.eh_proj.weight", "mtp.pre_fc_norm_embedding.weight": "nextn.enorm.weight",
             "mtp.pre_fc_norm_hidden.weight": "nextn.hnorm.weight", "mtp.norm.weight": "nextn.shared_head_norm.weight"}


def dummy_model(folder: Path, moe: bool, tied: bool, seed: int = 0):
    """A qwen35 model with random weights that make the tests bite, and its config.json in `folder`."""
    from conftest import make_weights_bite

    folder.mkdir(parents=True, exist_ok=True)
    d = {"model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text", **QUANT_TEXT, "tie_word_embeddings": tied}
    d.update(QUANT_MOE if moe else {"intermediate_size": 512})
    (folder / "config.json").write_text(json.dumps(d))
    model = qwen35.load_model(folder, load_format="dummy", dtype=torch.float32, seed=seed)
    make_weights_bite(model, seed)
    return model


def _tiled(w: torch.Tensor, dim: int, num_k: int, per_k: int, head_dim: int) -> torch.Tensor:
    """Value heads grouped by key head [k][r][d] -> ggml's tiled order [r][k][d] along `dim`."""
    shape = list(w.shape)
    w = w.reshape(*shape[:dim], num_k, per_k, head_dim, *shape[dim + 1:])
    return w.transpose(dim, dim + 1).reshape(shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights as the converter stores them (fp32 values, GGUF names and transforms)."""
    t = model.config.text
    num_k, num_v = t.linear_num_key_heads, t.linear_num_value_heads
    per_k, hv = num_v // num_k, t.linear_value_head_dim
    qk = 2 * num_k * t.linear_key_head_dim
    out: dict[str, np.ndarray] = {}
    for name, p in model.state_dict().items():
        w = p.detach().float().clone()
        if name == "model.embed_tokens.weight":
            key = "token_embd.weight"
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        elif name == "lm_head.weight":
            key = "output.weight"
        elif name in _MTP_LEAF:
            key = f"blk.{t.num_hidden_layers}.{_MTP_LEAF[name]}"
        elif name.startswith(("model.layers.", "mtp.layers.0.")):
            if name.startswith("mtp."):
                layer, leaf = t.num_hidden_layers, name[len("mtp.layers.0."):]
            else:
                _, _, layer, leaf = name.split(".", 3)
            if leaf == "mlp.experts.gate_up_proj":
                gate, up = w.chunk(2, dim=1)
                out[f"blk.{layer}.ffn_gate_exps.weight"] = gate.numpy()
                out[f"blk.{layer}.ffn_up_exps.weight"] = up.numpy()
                continue
            if leaf not in _LEAF:
                continue  # buffers (rotary tables)
            key = f"blk.{layer}.{_LEAF[leaf]}"
            if leaf == "linear_attn.A_log":
                w = -torch.exp(w)
            if num_k != num_v:
                if leaf in ("linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.in_proj_a.weight",
                            "linear_attn.in_proj_b.weight"):
                    w = _tiled(w, 0, num_k, per_k, 1)
                elif leaf == "linear_attn.in_proj_z.weight":
                    w = _tiled(w, 0, num_k, per_k, hv)
                elif leaf in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):
                    w = torch.cat([w[:qk], _tiled(w[qk:], 0, num_k, per_k, hv)])
                elif leaf == "linear_attn.out_proj.weight":
                    w = _tiled(w, 1, num_k, per_k, hv)
            if leaf == "linear_attn.conv1d.weight":
                w = w.squeeze(1)
        else:
            continue
        if key.endswith("norm.weight") and not key.endswith("ssm_norm.weight"):
            w = w + 1  # the converter stores zero-centred norm weights as w + 1
        out[key] = w.contiguous().numpy()
    return out


def random_blocks(kind: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Valid random blocks of a K-quant type (bytes [..., row_bytes]) whose values are O(1 / sqrt(K))."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = GGMLQuantizationType(kind)
    block, size = GGML_QUANT_SIZES[kind]
    *lead, K = shape
    nb = K // block
    b = rng.integers(0, 256, size=(*lead, nb, size), dtype=np.uint8)
    unit = 1.0 / np.sqrt(K)

    def f16(v):
        return np.asarray(v, dtype=np.float16).view(np.uint8).reshape(*lead, nb, 2)

    r = rng.uniform(0.5, 1.5, size=(*lead, nb))
    if kind == GGMLQuantizationType.Q6_K:  # w = d * sc * (q - 32), sc int8, q in 0..63
        b[..., 208:210] = f16(r * unit / (64 * 16))
    elif kind in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K):  # w = d*sc*q - dmin*m
        levels = 15 if kind == GGMLQuantizationType.Q4_K else 31
        b[..., 0:2] = f16(r * 2 * unit / (32 * levels))
        b[..., 2:4] = f16(r * unit / 32)
    elif kind == GGMLQuantizationType.Q2_K:  # scales[16], qs[64], d, dmin
        b[..., 80:82] = f16(r * unit / 16)
        b[..., 82:84] = f16(r * unit / 16)
    elif kind == GGMLQuantizationType.Q3_K:  # hmask[32], qs[64], scales[12], d
        b[..., 108:110] = f16(r * unit / 64)
    elif kind in (GGMLQuantizationType.IQ4_NL, GGMLQuantizationType.IQ4_XS):  # d first
        b[..., 0:2] = f16(r * unit / 128)
    else:
        raise ValueError(f"random_blocks: no random blocks for {kind.name}")
    return b.reshape(*lead, nb * size)


def write_gguf(model, path: Path, type_of: Callable[[str, tuple[int, ...]], int], seed: int = 0,
               chat_template: str | None = None, as_quantize: bool = False) -> Path:
    """Write `model` as a GGUF; `type_of(gguf_name, shape)` picks each tensor's type (a GGMLQuantizationType).
    `as_quantize`: as llama.cpp's quantize rewrites a converted file, which stores the [1, H] shared-expert gate
    as [H]."""
    import gguf
    from gguf.constants import GGMLQuantizationType as T

    t = model.config.text
    arch = "qwen35moe" if t.is_moe else "qwen35"
    w = gguf.GGUFWriter(str(path), arch)
    nextn = 1 if model.mtp is not None else 0
    w.add_uint32(f"{arch}.block_count", t.num_hidden_layers + nextn)
    if nextn:
        w.add_uint32(f"{arch}.nextn_predict_layers", nextn)
    w.add_uint32(f"{arch}.context_length", t.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", t.hidden_size)
    w.add_uint32(f"{arch}.attention.head_count", t.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", t.num_key_value_heads)
    w.add_uint32(f"{arch}.attention.key_length", t.head_dim)
    w.add_uint32(f"{arch}.attention.value_length", t.head_dim)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", t.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", t.rope.theta)
    w.add_uint32(f"{arch}.rope.dimension_count", t.rotary_dim)
    w.add_array(f"{arch}.rope.dimension_sections", [*t.rope.mrope_section, 0])
    w.add_uint32(f"{arch}.ssm.conv_kernel", t.linear_conv_kernel_dim)
    w.add_uint32(f"{arch}.ssm.state_size", t.linear_key_head_dim)
    w.add_uint32(f"{arch}.ssm.group_count", t.linear_num_key_heads)
    w.add_uint32(f"{arch}.ssm.time_step_rank", t.linear_num_value_heads)
    w.add_uint32(f"{arch}.ssm.inner_size", t.linear_num_value_heads * t.linear_value_head_dim)
    w.add_uint32(f"{arch}.full_attention_interval", 4)
    if t.is_moe:
        w.add_uint32(f"{arch}.expert_count", t.num_experts)
        w.add_uint32(f"{arch}.expert_used_count", t.num_experts_per_tok)
        w.add_uint32(f"{arch}.expert_feed_forward_length", t.moe_intermediate_size)
        w.add_uint32(f"{arch}.expert_shared_feed_forward_length", t.shared_expert_intermediate_size)
    else:
        w.add_uint32(f"{arch}.feed_forward_length", t.intermediate_size)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(seed)
    for name, value in gguf_tensors(model).items():
        if as_quantize and name.endswith("ffn_gate_inp_shexp.weight"):
            value = value.reshape(-1)
        kind = T(type_of(name, value.shape)) if value.ndim >= 2 else T.F32
        if kind == T.F32:
            w.add_tensor(name, value.astype(np.float32))
        elif kind in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS):  # gguf cannot quantize these
            w.add_tensor(name, random_blocks(kind, value.shape, rng), raw_dtype=kind)
        elif kind == T.F16:
            w.add_tensor(name, value.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(value.astype(np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
