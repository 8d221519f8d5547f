"""FP8 checkpoints written the way the official `-FP8` releases are (independent of qwen35's own quantiser).

Official layout (see ../shared/reference/Qwen3.5-397B-A17B-FP8/config.json): every 2-D weight not listed in
`modules_to_not_convert` is `F8_E4M3` with `<module>.weight_scale_inv` of shape [ceil(N/128), ceil(K/128)], a
multiplier per 128x128 tile (cropped at the edges); experts stored per expert; embeddings, lm_head, the GDN
conv1d / in_proj_a / in_proj_b, routers, shared-expert gates, the vision tower and `mtp.fc` stay BF16.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = 128
E4M3_MAX = 448.0

_KEEP_LEAVES = ("linear_attn.conv1d", "linear_attn.in_proj_a", "linear_attn.in_proj_b", "mlp.gate",
                "mlp.shared_expert_gate")


def not_converted(names: list[str]) -> list[str]:
    """`modules_to_not_convert` as the official config lists it for these tensor names."""
    mods = {"lm_head"}
    for n in names:
        if n.endswith("embed_tokens.weight"):
            mods.add(n[: -len(".weight")])
        mod = n[: -len(".weight")] if n.endswith(".weight") else n
        if n.startswith("model.visual.") and n.endswith(".weight") and "norm" not in n:
            mods.add(mod)
        elif mod.endswith(_KEEP_LEAVES) or mod == "mtp.fc":
            mods.add(mod)
    return sorted(mods)


def quantize_block_fp8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (F8_E4M3 [N, K], scale_inv [ceil(N/128), ceil(K/128)]): per tile, scale = amax / 448."""
    N, K = w.shape
    nb, kb = math.ceil(N / BLOCK), math.ceil(K / BLOCK)
    wf = w.float()
    pad = torch.zeros(nb * BLOCK, kb * BLOCK)
    pad[:N, :K] = wf
    tiles = pad.reshape(nb, BLOCK, kb, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-8)
    # the stored scale is what the file holds: quantise with it, so that q * scale is what a reader computes
    scale = (amax / E4M3_MAX).to(scale_dtype)
    full = scale.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:N, :K]
    q = (wf / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_block_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    return q.float() * scale.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:N, :K]


_FUSED = re.compile(r"^(?P<p>.*\.mlp\.experts)\.(?P<w>gate_up_proj|down_proj)$")


def per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused 3-D experts (BF16 layout) -> per-expert `experts.{e}.{gate,up,down}_proj.weight` (FP8 layout)."""
    out = {}
    for n, t in tensors.items():
        m = _FUSED.match(n)
        if m is None:
            out[n] = t
            continue
        for e in range(t.shape[0]):
            if m["w"] == "down_proj":
                out[f"{m['p']}.{e}.down_proj.weight"] = t[e].contiguous()
            else:
                inner = t.shape[1] // 2
                out[f"{m['p']}.{e}.gate_proj.weight"] = t[e, :inner].contiguous()
                out[f"{m['p']}.{e}.up_proj.weight"] = t[e, inner:].contiguous()
    return out


def fp8_tensors(tensors: dict[str, torch.Tensor], scale_dtype: torch.dtype = torch.bfloat16
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A BF16/FP32 state dict (checkpoint names) -> (the FP8 checkpoint's tensors, modules_to_not_convert)."""
    tensors = per_expert(tensors)
    keep = set(not_converted(list(tensors)))
    out = {}
    for n, t in tensors.items():
        mod = n[: -len(".weight")]
        if n.endswith(".weight") and t.dim() == 2 and mod not in keep and "norm" not in n:
            q, s = quantize_block_fp8(t, scale_dtype)
            out[n], out[f"{mod}.weight_scale_inv"] = q, s
        else:
            out[n] = t.to(torch.bfloat16) if t.is_floating_point() else t
    return out, sorted(keep)


def quantization_config(not_convert: list[str]) -> dict:
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
            "modules_to_not_convert": not_convert}


def write_fp8_checkpoint(src: Path, dst: Path, scale_dtype: torch.dtype = torch.bfloat16,
                         extra: dict[str, torch.Tensor] | None = None, shards: int = 1) -> Path:
    """Convert the single-file checkpoint in `src` (as save_pretrained wrote it) into an FP8 folder `dst`
    (`extra` tensors, e.g. mtp.*, added before converting; `shards` > 1 writes an index)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    tensors.update(extra or {})
    out, keep = fp8_tensors(tensors, scale_dtype)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(keep)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors", "model.safetensors.index.json") and f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    names = sorted(out)
    if shards == 1:
        save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: out[n] for n in part}, dst / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst
