"""Block-scaled FP8 weights (e4m3, 128x128 tiles), as the official Qwen3.5 `-FP8` checkpoints ship them.

Stored in 8 bits: `qweight` float8_e4m3fn [..., N, K]; `scale` fp32 [..., S, ceil(K/128)], a table of scale
rows; `srow` int32 [N], the scale row of each weight row, so W[n, k] = qweight[n, k] * scale[srow[n], k // 128]
(exact in fp32: an e4m3 value has 4 significant bits, a bf16/f16 scale at most 11). A plain matrix has
srow[n] = n // 128; matrices fused along rows (q|k|v, gate|up) concatenate their tables and offset srow, so
a part whose rows are not a multiple of 128 keeps its own tiles.

Paths, each held to `linear_reference` (widen, then F.linear) by tests: decode rows (<= FP8_GEMV_MAX_ROWS)
through the FP8 GEMV (csrc/fp8.cpp: fp8 -> bf16 in registers, exact products, per-tile fp32 sums times the
scale); more rows through the prefill GEMM, which widens tiles of rows to bf16 in cache and hands them to
oneDNN; MoE decode through the FP8 expert kernel. Elsewhere (CUDA, no compiler) the twin runs: widen, then
matmul.
"""

from __future__ import annotations

import math

import torch

from qwen35.ops import cpu_kernels
from qwen35.ops.experts import MOE_KERNEL_MAX_TOKENS
from qwen35.ops.hugepages import advise_hugepages
from qwen35.ops.quant.base import Tensors, WeightFormat, concat_rows, kernel_rows

BLOCK = 128
E4M3_MAX = 448.0
FP8_GEMV_MAX_ROWS = 32  # the FP8 GEMV's limit; above it the tile-widening GEMM (compute-bound) takes over


def scale_rows(rows: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """srow for row groups of `rows` rows, each quantised on its own 128-row grid."""
    out, offset = [], 0
    for r in rows:
        out.append(offset + torch.arange(r, dtype=torch.int32, device=device) // BLOCK)
        offset += math.ceil(r / BLOCK)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int32, device=device)


def quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One matrix [N, K] -> (e4m3 [N, K], fp32 scale [ceil(N/128), ceil(K/128)]) with scale = amax / 448 per
    tile, as the official FP8 checkpoints are made. 128 rows at a time (small fp32 temporaries)."""
    N, K = w.shape
    kb = math.ceil(K / BLOCK)
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(math.ceil(N / BLOCK), kb, dtype=torch.float32, device=w.device)
    for i, r0 in enumerate(range(0, N, BLOCK)):
        rows = w[r0:r0 + BLOCK].float()
        pad = torch.nn.functional.pad(rows, (0, kb * BLOCK - K))
        amax = pad.reshape(rows.shape[0], kb, BLOCK).abs().amax(dim=(0, 2))
        s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        scale[i] = s
        full = s.repeat_interleave(BLOCK)[:K]
        q[r0:r0 + BLOCK] = (rows / full).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class FP8(WeightFormat):
    name = "fp8"
    fields = ("qweight", "scale", "srow")
    shared_fields = ("srow",)

    @classmethod
    def quantize(cls, w: torch.Tensor, row_parts: list[int] | None = None) -> Tensors:
        rows = row_parts or [w.shape[-2]]
        if sum(rows) != w.shape[-2]:
            raise ValueError(f"row_parts {rows} do not add up to the weight's {w.shape[-2]} rows")
        stack = w.reshape(-1, *w.shape[-2:])
        qs, scales = [], []
        for mat in stack:
            parts = [quantize_block(p) for p in mat.split(rows)]
            qs.append(torch.cat([p[0] for p in parts]))
            scales.append(torch.cat([p[1] for p in parts]))
        q = torch.stack(qs).reshape(w.shape)
        scale = torch.stack(scales).reshape(*w.shape[:-2], *scales[0].shape)
        return {"qweight": advise_hugepages(q.contiguous()), "scale": scale, "srow": scale_rows(rows, w.device)}

    @classmethod
    def empty(cls, rows: list[int], in_features: int, experts: int | None = None,
              device: torch.device | str = "cpu") -> Tensors:
        lead = () if experts is None else (experts,)
        s = sum(math.ceil(r / BLOCK) for r in rows)
        return {"qweight": torch.empty(*lead, sum(rows), in_features, dtype=torch.float8_e4m3fn, device=device),
                "scale": torch.empty(*lead, s, math.ceil(in_features / BLOCK), dtype=torch.float32, device=device),
                **cls.derived(rows, device)}

    @classmethod
    def derived(cls, rows: list[int], device: torch.device | str = "cpu") -> Tensors:
        return {"srow": scale_rows(rows, device)}

    @classmethod
    def dequantize(cls, t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, scale, srow = t["qweight"], t["scale"], t["srow"]
        s = scale.index_select(-2, srow.long()).repeat_interleave(BLOCK, dim=-1)[..., : q.shape[-1]]
        return (q.to(torch.float32) * s).to(dtype)

    @classmethod
    def linear(cls, x: torch.Tensor, t) -> torch.Tensor:
        q = t["qweight"]
        x2 = kernel_rows(x, q)
        k = cpu_kernels.kernels() if x2 is not None else None
        if k is not None and hasattr(k, "gemv_fp8"):
            qb = q.view(torch.uint8)
            if x2.shape[0] <= FP8_GEMV_MAX_ROWS:
                y = k.gemv_fp8(x2, qb, t["scale"], t["srow"], True)
            else:
                y = k.linear_fp8_prefill(x2, qb, t["scale"], t["srow"])
            return y.reshape(*x.shape[:-1], q.shape[0])
        return cls.linear_reference(x, t)

    @classmethod
    def concat(cls, parts) -> tuple[Tensors, list[Tensors]]:
        q, qs = concat_rows([p["qweight"] for p in parts])
        tables = [p["scale"].shape[0] for p in parts]
        scale = torch.cat([p["scale"] for p in parts])
        offsets = [sum(tables[:i]) for i in range(len(parts))]
        srow = torch.cat([p["srow"] + o for p, o in zip(parts, offsets, strict=True)])
        views = [{"qweight": a, "scale": b, "srow": p["srow"]}
                 for a, b, p in zip(qs, scale.split(tables), parts, strict=True)]
        return {"qweight": q, "scale": scale, "srow": srow}, views

    @classmethod
    def experts_kernel(cls, x, gate_up, down, ids, weights, down_fmt=None) -> torch.Tensor | None:
        if not (down_fmt in (None, cls) and x.device.type == "cpu" and x.dim() == 2
                and x.shape[0] <= MOE_KERNEL_MAX_TOKENS and x.dtype == torch.bfloat16
                and weights.dtype == torch.bfloat16):
            return None
        k = cpu_kernels.kernels()
        if k is None or not hasattr(k, "moe_experts_fp8"):
            return None
        return k.moe_experts_fp8(x, gate_up["qweight"].view(torch.uint8), gate_up["scale"], gate_up["srow"],
                                 down["qweight"].view(torch.uint8), down["scale"], down["srow"], ids, weights)
