"""GGUF (llama.cpp) block types kept quantized in memory: Q8_0, Q4_K, Q5_K and Q6_K.

Stored as the file stores them: `qweight` uint8 [..., N, row_bytes], each row K / block_elems consecutive blocks
(blocks run along K only, so rows are independent: reordering or fusing rows moves whole rows of bytes). The
layouts (ggml's block_q8_0, block_q4_K, block_q5_K, block_q6_K):
  * Q8_0, 32 weights in 34 bytes: fp16 d, int8 q[32]; w = d * q.
  * Q4_K, 256 in 144: fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of nibbles (chunk c
    of 64 weights: the low nibbles of bytes 32c.. are sub-block 2c, the high ones 2c + 1); w = d*sc*q - dmin*m.
  * Q5_K, 256 in 176: Q4_K with a fifth bit per weight in 32 bytes qh (bit j of byte l for sub-block j).
  * Q6_K, 256 in 210: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per 16 weights), fp16 d;
    w = d * sc * (q - 32).
`dequantize` here is the obviously-correct twin, written from those layouts in torch and held bit-for-bit to
`gguf.quants.dequantize` by tests; `linear` runs csrc/gguf.cpp (decode GEMV up to GGUF_GEMV_MAX_ROWS rows,
tile-widening GEMM above, a MoE expert kernel) where it applies, the twin elsewhere.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qwen35.ops import cpu_kernels
from qwen35.ops.experts import MOE_KERNEL_MAX_TOKENS
from qwen35.ops.quant.base import Tensors, WeightFormat, concat_rows, kernel_rows

# Tokens per call of the grouped MoE kernel (prefill): its per-(token, expert) outputs are T * k * H bf16 values
# (16 MiB at 512 tokens on the MoE bench shape, H = 2048, k = 8).
GGUF_MOE_PREFILL_TOKENS = 512

GGUF_GEMV_MAX_ROWS = 32  # csrc/gguf.cpp's GEMV limit; more rows go through the tile-widening GEMM


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from pairs of bytes [..., 2] -> fp32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of Q4_K / Q5_K from their 12 bytes [B, 12] -> two [B, 8] (fp32)."""
    lo, hi, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (mix & 0xF) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


class GGUFBlocks(WeightFormat):
    """A GGUF block type: one field, the file's bytes. Subclasses give the block geometry and the twin."""

    fields = ("qweight",)
    ggml_type: ClassVar[int]  # gguf.GGMLQuantizationType value: the kernels' type id
    block_elems: ClassVar[int]
    block_bytes: ClassVar[int]

    @classmethod
    def row_bytes(cls, in_features: int) -> int:
        if in_features % cls.block_elems:
            raise ValueError(f"{cls.name}: {in_features} input features is not a multiple of the block of "
                             f"{cls.block_elems}")
        return in_features // cls.block_elems * cls.block_bytes

    @classmethod
    def in_features(cls, qweight: torch.Tensor) -> int:
        return qweight.shape[-1] // cls.block_bytes * cls.block_elems

    @classmethod
    def empty(cls, rows: list[int], in_features: int, experts: int | None = None,
              device: torch.device | str = "cpu") -> Tensors:
        lead = () if experts is None else (experts,)
        return {"qweight": torch.empty(*lead, sum(rows), cls.row_bytes(in_features), dtype=torch.uint8,
                                       device=device)}

    @classmethod
    def blocks_to_fp32(cls, blocks: torch.Tensor) -> torch.Tensor:
        """[B, block_bytes] uint8 -> [B, block_elems] fp32."""
        raise NotImplementedError

    @classmethod
    def dequantize(cls, t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = t["qweight"]
        lead, rb = q.shape[:-1], q.shape[-1]
        w = cls.blocks_to_fp32(q.reshape(-1, cls.block_bytes))
        return w.reshape(*lead, rb // cls.block_bytes * cls.block_elems).to(dtype)

    @classmethod
    def dequantize_rows(cls, qweight: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` widened (an embedding lookup): the kernel where it applies, else the twin on the rows."""
        k = cpu_kernels.kernels()
        if (k is not None and hasattr(k, "gguf_dequant_rows") and qweight.device.type == "cpu"
                and dtype in (torch.bfloat16, torch.float32)):
            flat = ids.reshape(-1).to(torch.int64)
            out = k.gguf_dequant_rows(qweight, cls.ggml_type, cls.in_features(qweight), flat,
                                      dtype == torch.bfloat16)
            return out.reshape(*ids.shape, out.shape[-1])
        return cls.dequantize({"qweight": qweight.index_select(0, ids.reshape(-1))}, dtype).reshape(
            *ids.shape, cls.in_features(qweight))

    @classmethod
    def linear_reference(cls, x: torch.Tensor, t) -> torch.Tensor:
        """The twin: the exact fp32 weight (not rounded to x's dtype) times x in fp32, rounded once, as the kernels
        compute it (up to summation order)."""
        return torch.nn.functional.linear(x.float(), cls.dequantize(t, torch.float32)).to(x.dtype)

    @classmethod
    def linear(cls, x: torch.Tensor, t) -> torch.Tensor:
        q = t["qweight"]
        x2 = kernel_rows(x, q)
        k = cpu_kernels.kernels() if x2 is not None else None
        if k is not None and hasattr(k, "gemv_gguf"):
            if x2.shape[0] <= GGUF_GEMV_MAX_ROWS:
                y = k.gemv_gguf(x2, q, cls.ggml_type)
            else:
                y = k.linear_gguf_prefill(x2, q, cls.ggml_type)
            return y.reshape(*x.shape[:-1], q.shape[0])
        return cls.linear_reference(x, t)

    @classmethod
    def concat(cls, parts) -> tuple[Tensors, list[Tensors]]:
        q, views = concat_rows([p["qweight"] for p in parts])
        return {"qweight": q}, [{"qweight": v} for v in views]

    @classmethod
    def experts_kernel(cls, x, gate_up, down, ids, weights, down_fmt: type[WeightFormat] | None = None):
        """The routed experts in a compiled kernel: per token for decode batches, grouped by expert for prompts
        (each expert's rows widened once for all its tokens); None where neither applies (ExpertDispatch's loop,
        the twin of both, runs instead)."""
        down_fmt = down_fmt or cls
        if not (issubclass(down_fmt, GGUFBlocks) and x.device.type == "cpu" and x.dim() == 2
                and x.dtype == torch.bfloat16 and weights.dtype == torch.bfloat16):
            return None
        k = cpu_kernels.kernels()
        if k is None or not hasattr(k, "moe_experts_gguf_grouped"):
            return None
        inner = down_fmt.in_features(down["qweight"])
        args = (gate_up["qweight"], cls.ggml_type, down["qweight"], down_fmt.ggml_type, inner)
        if x.shape[0] <= MOE_KERNEL_MAX_TOKENS:
            return k.moe_experts_gguf(x, *args, ids, weights)
        # a long prompt in pieces: the kernel holds every (token, expert) pair's output row at once
        step = GGUF_MOE_PREFILL_TOKENS
        return torch.cat([k.moe_experts_gguf_grouped(x[i:i + step], *args, ids[i:i + step], weights[i:i + step])
                          for i in range(0, x.shape[0], step)])


class Q8_0(GGUFBlocks):
    name = "q8_0"
    ggml_type, block_elems, block_bytes = 8, 32, 34

    @classmethod
    def blocks_to_fp32(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = _f16(blocks[:, 0:2].reshape(-1, 1, 2))
        return blocks[:, 2:].view(torch.int8).float() * d


def _k_values(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K weights from their blocks [B, bytes] and quants q [B, 8, 32] (fp32): d*sc*q - dmin*m."""
    B = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2].reshape(B, 1, 2)), _f16(blocks[:, 2:4].reshape(B, 1, 2))
    sc, mn = _k_scales(blocks[:, 4:16])
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(B, 256)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes of nibbles [B, 128] -> [B, 8, 32]: chunk c's low nibbles are sub-block 2c, its high ones 2c + 1."""
    qs = qs.reshape(qs.shape[0], 4, 1, 32)
    return torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(qs.shape[0], 8, 32)


class Q4_K(GGUFBlocks):
    name = "q4_k"
    ggml_type, block_elems, block_bytes = 12, 256, 144

    @classmethod
    def blocks_to_fp32(cls, blocks: torch.Tensor) -> torch.Tensor:
        return _k_values(blocks, _k_nibbles(blocks[:, 16:144]).float())


class Q5_K(GGUFBlocks):
    name = "q5_k"
    ggml_type, block_elems, block_bytes = 13, 256, 176

    @classmethod
    def blocks_to_fp32(cls, blocks: torch.Tensor) -> torch.Tensor:
        qh = blocks[:, 16:48].reshape(blocks.shape[0], 1, 32)
        bits = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
        # bit j of qh byte l: the fifth bit of sub-block j, weight l
        return _k_values(blocks, (_k_nibbles(blocks[:, 48:176]) | (((qh >> bits) & 1) << 4)).float())


class Q6_K(GGUFBlocks):
    name = "q6_k"
    ggml_type, block_elems, block_bytes = 14, 256, 210

    @classmethod
    def blocks_to_fp32(cls, blocks: torch.Tensor) -> torch.Tensor:
        B = blocks.shape[0]
        ql = blocks[:, 0:128].reshape(B, 2, 1, 64)  # per half of 128 weights: 64 bytes of two nibbles
        qh = blocks[:, 128:192].reshape(B, 2, 1, 32)  # per half: 32 bytes of four 2-bit highs
        sc = blocks[:, 192:208].view(torch.int8).float()
        d = _f16(blocks[:, 208:210].reshape(B, 1, 2))
        low = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(B, 2, 4, 32)  # quarters: q1 q2 (low) q3 q4 (high)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
        high = (qh >> shifts) & 3
        q = ((low | (high << 4)).to(torch.int16) - 32).float().reshape(B, 16, 16)
        return ((d * sc)[:, :, None] * q).reshape(B, 256)


KEPT_TYPES: dict[int, type[GGUFBlocks]] = {f.ggml_type: f for f in (Q8_0, Q4_K, Q5_K, Q6_K)}
