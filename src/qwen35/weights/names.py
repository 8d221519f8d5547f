"""Checkpoint tensor names -> parameters of `Qwen35Model`.

Official checkpoints come in two layouts: `model.language_model.*` + `model.visual.*` + `lm_head.*` +
`mtp.*` (ConditionalGeneration) and `model.*` + `lm_head.*` (CausalLM). MoE experts are either fused
3-D (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`, BF16 checkpoints) or per
expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`, FP8 checkpoints and transformers' save_pretrained).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: parameter `param`, optionally one expert `expert` and one half
    (`part` 0 = gate rows, 1 = up rows) of a fused gate_up tensor."""

    param: str
    expert: int | None = None
    part: int | None = None


def param_name(ckpt_name: str) -> str | None:
    """Our parameter name for a checkpoint name (before expert splitting), or None if foreign."""
    if ckpt_name.startswith("model.language_model."):
        return "model." + ckpt_name[len("model.language_model."):]
    if ckpt_name.startswith("model.visual."):
        return "visual." + ckpt_name[len("model.visual."):]
    if ckpt_name.startswith(("model.", "lm_head.", "mtp.")):
        return ckpt_name
    return None


def target_of(ckpt_name: str) -> Target | None:
    name = param_name(ckpt_name)
    if name is None:
        return None
    m = _EXPERT.match(name)
    if m is None:
        return Target(name)
    prefix, e, proj = m["prefix"], int(m["e"]), m["proj"]
    if proj == "down_proj":
        return Target(f"{prefix}.down_proj", e)
    return Target(f"{prefix}.gate_up_proj", e, 0 if proj == "gate_proj" else 1)
