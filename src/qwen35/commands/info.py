"""`qwen35 info MODEL`: parameter counts and memory figures, for the model and its all-full-attention twin."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwen35.config import ModelConfig, find_preset
from qwen35.model_info import full_attention_twin, model_info
from qwen35.weights.gguf import gguf_bytes_by_type, gguf_loaded_bytes, is_gguf, read_gguf_config
from qwen35.weights.hub import resolve_model_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder, preset name (e.g. Qwen3.5-397B-A17B) or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--context", type=int, default=None, help="context length (default: max_position_embeddings)")
    p.add_argument("--batch", type=int, default=1, help="number of sequences")
    p.add_argument("--quantization", default=None, choices=["int8", "fp8"],
                   help="weights as --quantization would hold them (default: as the checkpoint stores them: "
                        "FP8 for an FP8 folder, else bf16)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="also show one rank's memory with the model split over this many processes")
    p.add_argument("--enable-expert-parallel", action="store_true", help="with --tensor-parallel-size: MoE "
                   "layers split by expert")


def load_config(name: str) -> ModelConfig:
    if is_gguf(name):
        return read_gguf_config(name)
    if Path(name).exists():
        return ModelConfig.from_pretrained(name)
    preset = find_preset(name)
    if preset is not None:
        return preset
    return ModelConfig.from_file(resolve_model_path(name, weights=False))


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.model)
    quant = args.quantization
    if quant is None and (cfg.quantization or {}).get("quant_method") == "fp8":
        quant = "fp8"
    info = model_info(cfg, args.context, args.batch, quantization=quant, tensor_parallel_size=args.tensor_parallel_size,
                      expert_parallel=args.enable_expert_parallel)
    twin = model_info(full_attention_twin(cfg), args.context, args.batch, quantization=quant)
    by_type = gguf_bytes_by_type(args.model) if is_gguf(args.model) else None
    if args.json:
        extra = {"gguf_bytes_by_type": by_type} if by_type is not None else {}
        print(json.dumps({"model": args.model, **info.as_dict(), **extra, "full_attention_twin": twin.as_dict()},
                         indent=2))
        return 0
    fmt = info.quantization or "bf16"
    t = cfg.text
    kind = (f"MoE {t.num_experts} experts, top-{t.num_experts_per_tok} + shared" if t.is_moe else "dense")
    n_lin, n_att = len(t.linear_layers), len(t.attention_layers)
    rows = [
        ("model", args.model),
        ("kind", f"{kind}; {t.num_hidden_layers} layers ({n_lin} Gated DeltaNet + {n_att} full attention)"),
        ("params_total (no MTP)", f"{info.params_total:,} ({info.params_total / 1e9:.2f}B)"),
        ("params_active per token", f"{info.params_active:,} ({info.params_active / 1e9:.2f}B)"),
        ("params_vision", f"{info.params_vision:,}"),
        ("params_mtp", f"{info.params_mtp:,}"),
        ("weights bf16 / fp8 / int8 / int4", f"{_gib(info.weight_bytes_bf16)} / {_gib(info.weight_bytes_fp8)} / "
                                             f"{_gib(info.weight_bytes_int8)} / {_gib(info.weight_bytes_int4)}"),
        (f"weights ({fmt})", _gib(info.weight_bytes)),
        ("kv_bytes_per_token (bf16)", f"{info.kv_bytes_per_token:,}"),
        ("state_bytes_per_sequence", f"{info.state_bytes_per_sequence:,} "
                                     f"({info.state_bytes_per_sequence / 2**20:.1f} MiB)"),
        (f"cache at context {info.context:,} x batch {info.batch}", _gib(info.cache_bytes)),
        (f"total memory ({fmt} weights + cache)", _gib(info.total_bytes)),
        ("all-full-attention twin: kv_bytes_per_token", f"{twin.kv_bytes_per_token:,}"),
        ("all-full-attention twin: cache", _gib(twin.cache_bytes)),
        ("all-full-attention twin: total", _gib(twin.total_bytes)),
        ("cache ratio twin / hybrid", f"{twin.cache_bytes / info.cache_bytes:.2f}x"),
    ]
    if by_type is not None:  # loaded as the file stores it: kernel types kept, the rest widened to bf16
        loaded = gguf_loaded_bytes(args.model)
        rows[7] = ("weights (GGUF as loaded in bf16)", _gib(loaded))
        rows[11] = ("total memory (GGUF weights + cache)", _gib(loaded + info.cache_bytes))
        total = sum(r["bytes"] for r in by_type.values())
        rows.insert(7, ("GGUF file (all tensors, MTP included)", _gib(total)))
        for i, (kind, r) in enumerate(by_type.items()):
            rows.insert(8 + i, (f"  {kind}", f"{r['tensors']} tensors, {r['elements']:,} weights, {_gib(r['bytes'])}"))
    if info.tensor_parallel_size > 1:
        n = info.tensor_parallel_size
        how = ", expert parallel" if info.expert_parallel else ""
        rows += [(f"per rank of {n}{how}: weights ({fmt})", _gib(info.weight_bytes_per_rank)),
                 (f"per rank of {n}: cache", _gib(info.cache_bytes_per_rank)),
                 (f"per rank of {n}: total", _gib(info.total_bytes_per_rank))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
