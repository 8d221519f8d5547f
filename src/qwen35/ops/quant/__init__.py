"""Compressed weight formats, in one place behind one interface (`base.WeightFormat`).

`int8` (per-row int8, made at load) and `fp8` (block-scaled e4m3, read from official FP8 checkpoints or made at
load) today; the GGUF block types join here. Layers never look at the format: a quantised linear layer is a
`QuantLinear`, quantised routed experts are `QuantExperts`, both calling their format's kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35.ops.quant.base import QuantExperts, QuantLinear, WeightFormat
from qwen35.ops.quant.fp8 import FP8
from qwen35.ops.quant.int8 import Int8, int8_gemv_reference, int8_linear, int8_linear_reference, quantize_rows

FORMATS: dict[str, type[WeightFormat]] = {"int8": Int8, "fp8": FP8}

# Linear layers each format leaves in the model dtype (by attribute name, or dotted path from the model): tiny
# ones and those feeding sensitive gates. FP8 follows the official checkpoints' modules_to_not_convert (which
# also keeps the head); int8 quantises the head too (a third of the 0.8B's bytes per token).
KEPT = {"int8": ("in_proj_a", "in_proj_b", "shared_expert_gate"),
        "fp8": ("in_proj_a", "in_proj_b", "shared_expert_gate", "mtp.fc", "lm_head")}


def get_format(name: str) -> type[WeightFormat]:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}: expected one of {sorted(FORMATS)}") from None


@torch.no_grad()
def quantize_model(model: nn.Module, name: str) -> nn.Module:
    """Replace the model's Linear layers (and MoE experts) by `name`-format versions in place. Embeddings,
    norms, routers, the vision tower and the format's KEPT layers stay as they are. Under int8 a tied head gets
    its own quantised copy (the embedding stays exact)."""
    from qwen35.model.mlp import Experts
    from qwen35.ops.linear import Linear

    fmt = get_format(name)
    kept = KEPT[name]
    for path, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{path}.{child_name}" if path else child_name
            if child_name in kept or full in kept:
                continue
            if isinstance(child, Linear):
                setattr(parent, child_name, QuantLinear.from_weight(fmt, child.weight.data))
            elif isinstance(child, Experts):
                setattr(parent, child_name, QuantExperts.from_weights(fmt, child.gate_up_proj.data,
                                                                      child.down_proj.data))
    if "lm_head" not in kept and getattr(model, "lm_head", "absent") is None:
        model.lm_head = QuantLinear.from_weight(fmt, model.model.embed_tokens.weight.data)
    model.quantization = name
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    return quantize_model(model, "int8")


__all__ = ["FORMATS", "FP8", "KEPT", "Int8", "QuantExperts", "QuantLinear", "WeightFormat", "get_format",
           "int8_gemv_reference", "int8_linear", "int8_linear_reference", "quantize_int8", "quantize_model",
           "quantize_rows"]
