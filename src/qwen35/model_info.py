"""Capacity planning: parameter counts, weight bytes and cache memory of a model, from its config alone.

Counts come from the real module tree built on the meta device (no storage), so they always agree with
what `load_model` builds.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from qwen35.config import ModelConfig, ceil_div
from qwen35.model import CacheLayout
from qwen35.model.qwen35 import Qwen35Model

# Linear weights that FP8 checkpoints keep in bf16 (FACTS.md, modules_to_not_convert), matched by suffix.
_FP8_KEPT = ("embed_tokens.weight", "lm_head.weight", "conv1d.weight", "in_proj_a.weight", "in_proj_b.weight",
             "mlp.gate.weight", "shared_expert_gate.weight", "mtp.fc.weight")
BLOCK = 128  # FP8 block size [128, 128] with fp32 scales; int4 groups of 128 with bf16 scales


@dataclass
class ModelInfo:
    params_total: int  # every weight but the MTP head (text + vision)
    params_text: int
    params_active: int  # per text token: all but the routed experts, plus top_k/num_experts of those
    params_vision: int
    params_mtp: int
    weight_bytes_bf16: int
    weight_bytes_fp8: int
    weight_bytes_int8: int
    weight_bytes_int4: int
    kv_bytes_per_token: int  # bf16 KV over the full-attention layers
    state_bytes_per_sequence: int  # fp32 GDN state + bf16 conv window, all GDN layers
    context: int
    batch: int
    cache_bytes: int  # batch * (context * kv + state)
    total_bytes_bf16: int  # bf16 weights (no MTP) + cache
    quantization: str | None  # the format of `weight_bytes` (None: bf16)
    weight_bytes: int  # the weights (no MTP) as `quantization` holds them
    total_bytes: int  # weight_bytes + cache
    tensor_parallel_size: int = 1
    expert_parallel: bool = False
    weight_bytes_per_rank: int = 0  # one rank's share of `weight_bytes` (replicated parts whole)
    cache_bytes_per_rank: int = 0  # its cache: the KV and GDN state of its heads only
    total_bytes_per_rank: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# int8 (qwen35's --quantization int8) keeps fewer in bf16: it quantises the head (a copy when tied) and mtp.fc
_INT8_KEPT = ("embed_tokens.weight", "conv1d.weight", "in_proj_a.weight", "in_proj_b.weight", "mlp.gate.weight",
              "shared_expert_gate.weight")


def _quantized(name: str, p: torch.Tensor, fmt: str = "fp8") -> bool:
    """Would this tensor be stored quantized? Linear-like weights, not the kept ones."""
    kept = _INT8_KEPT if fmt == "int8" else _FP8_KEPT
    if name.startswith("visual.") or p.dim() < 2 or name.endswith(kept):
        return False
    return True


def _weight_bytes(named: list[tuple[str, torch.Tensor]], fmt: str, tied: bool = False) -> int:
    total = 0
    for name, p in named:
        n = p.numel()
        if fmt == "bf16" or not _quantized(name, p, fmt):
            total += 2 * n
            if fmt == "int8" and name.endswith("embed_tokens.weight") and tied:
                total += n + 4 * p.shape[0]  # the tied head's int8 copy
            continue
        rows, cols = p.shape[-2], p.shape[-1]
        mats = n // (rows * cols)
        if fmt == "fp8":  # 1 byte per weight, fp32 scales per 128x128 tile, an int32 scale row per weight row
            total += n + 4 * mats * ceil_div(rows, BLOCK) * ceil_div(cols, BLOCK) + 4 * rows
        elif fmt == "int8":  # 1 byte per weight, an fp32 scale per row
            total += n + 4 * mats * rows
        else:  # int4, group 128 along the input dim
            total += ceil_div(n, 2) + 2 * mats * rows * ceil_div(cols, BLOCK)
    return total


def model_info(config: ModelConfig, context: int | None = None, batch: int = 1,
               quantization: str | None = None, tensor_parallel_size: int = 1,
               expert_parallel: bool = False) -> ModelInfo:
    """Figures for `config`; `quantization` (None, "int8", "fp8") picks the format of `weight_bytes`;
    `tensor_parallel_size` N: also one rank's share of the weights and of the cache (qwen35.parallel.layout)."""
    if quantization not in (None, "int8", "fp8"):
        raise ValueError(f"quantization={quantization!r}: expected None, 'int8' or 'fp8'")
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    t = config.text
    context = t.max_position_embeddings if context is None else context
    if context <= 0:
        raise ValueError(f"context must be positive, got {context}")
    model = Qwen35Model.on_meta(config, with_mtp=t.mtp_num_hidden_layers > 0, with_vision=config.vision is not None)
    named = list(model.named_parameters())
    main = [(n, p) for n, p in named if not n.startswith("mtp.")]
    text = [(n, p) for n, p in main if not n.startswith("visual.")]
    routed = sum(p.numel() for n, p in text if ".experts." in n)
    params_text = sum(p.numel() for _, p in text)
    active = params_text - routed + (routed * t.num_experts_per_tok // t.num_experts if t.is_moe else 0)
    layout = CacheLayout.of(t, torch.bfloat16, block_size=1)
    kv, state = layout.block_bytes, layout.slot_bytes
    cache = batch * (context * kv + state)
    bf16 = _weight_bytes(main, "bf16")
    by_format = {"bf16": bf16, "fp8": _weight_bytes(main, "fp8"),
                 "int8": _weight_bytes(main, "int8", tied=t.tie_word_embeddings),
                 "int4": _weight_bytes(main, "int4")}
    chosen = by_format[quantization or "bf16"]
    per_rank = {"weight_bytes_per_rank": chosen, "cache_bytes_per_rank": cache, "total_bytes_per_rank": chosen + cache}
    if tensor_parallel_size > 1:
        from qwen35.parallel import TensorParallel

        tp = TensorParallel(0, tensor_parallel_size, expert_parallel=expert_parallel)  # every rank's share is alike
        share = Qwen35Model.on_meta(config, with_mtp=t.mtp_num_hidden_layers > 0,
                                    with_vision=config.vision is not None, tp=tp)
        share_main = [(n, p) for n, p in share.named_parameters() if not n.startswith("mtp.")]
        w = _weight_bytes(share_main, quantization or "bf16", tied=t.tie_word_embeddings)
        lay = CacheLayout.of(share.cache_config, torch.bfloat16, block_size=1)
        c = batch * (context * lay.block_bytes + lay.slot_bytes)
        per_rank = {"tensor_parallel_size": tensor_parallel_size, "expert_parallel": expert_parallel,
                    "weight_bytes_per_rank": w, "cache_bytes_per_rank": c, "total_bytes_per_rank": w + c}
    return ModelInfo(
        params_total=sum(p.numel() for _, p in main), params_text=params_text, params_active=active,
        params_vision=sum(p.numel() for n, p in named if n.startswith("visual.")),
        params_mtp=sum(p.numel() for n, p in named if n.startswith("mtp.")),
        weight_bytes_bf16=bf16, weight_bytes_fp8=by_format["fp8"], weight_bytes_int8=by_format["int8"],
        weight_bytes_int4=by_format["int4"],
        kv_bytes_per_token=kv, state_bytes_per_sequence=state, context=context, batch=batch,
        cache_bytes=cache, total_bytes_bf16=bf16 + cache, quantization=quantization, weight_bytes=chosen,
        total_bytes=chosen + cache, **per_rank,
    )


def full_attention_twin(config: ModelConfig) -> ModelConfig:
    """The same model with every layer full attention (what a pure-transformer design would cost)."""
    twin = copy.deepcopy(config)
    twin.text.layer_types = ["full_attention"] * twin.text.num_hidden_layers
    return twin
