"""Weight-only int8 (`quantization="int8"`): int8 weights, one fp32 scale per output row.

Decoding reads half the bytes of bf16. Few rows (decode) go through the int8 GEMV kernel; many rows
(prefill) through torch's int8-weight matmul; `int8_linear_reference` (dequantise, then F.linear) is the
obviously-correct twin they are both tested against. Where the CPU has AVX512-VNNI the kernel also rounds
each activation row to int16 (its own scale) and multiplies in integers; `int8_gemv_reference` is exactly
that computation, and its distance to `int8_linear_reference` is bounded in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.ops import cpu_kernels
from qwen35.ops.hugepages import advise_hugepages
from qwen35.ops.quant.base import Tensors, WeightFormat, concat_rows

INT8_GEMV_MAX_ROWS = 32  # the int8 kernel's limit (torch has no fast few-row int8 product to hand over to)
INT8PACK_MAX_ROWS = 256  # above this, dequantise + F.linear (see int8_linear)


def quantize_rows(w: torch.Tensor, block_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ~= q * scale[..., None]. w [..., N, K] -> (int8 [..., N, K], fp32 [..., N]).
    Done `block_rows` rows at a time, so the fp32 temporaries stay small (the 0.8B head is 1 GB in fp32)."""
    flat = w.reshape(-1, w.shape[-1])
    q = advise_hugepages(torch.empty(flat.shape, dtype=torch.int8, device=w.device))  # streamed when decoding
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=w.device)
    for a in range(0, flat.shape[0], block_rows):
        wf = flat[a:a + block_rows].to(torch.float32, copy=True)  # never divide the weight itself
        sc = wf.abs().amax(-1).clamp(min=1e-12) / 127.0
        q[a:a + block_rows] = torch.round(wf.div_(sc[:, None])).clamp_(-127, 127)
        scale[a:a + block_rows] = sc
    return q.reshape(w.shape), scale.reshape(w.shape[:-1])


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x, (q.float() * scale[:, None]).to(x.dtype))


def int8_gemv_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the VNNI GEMV computes: x [M, K] rounded to int16 per row (scale max|x| / 32767, fp32 maths as in
    the kernel), integer products with q, then both scales -> fp32 [M, N]."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xf * inv)
    acc = xq.double() @ q.double().T
    return (acc * ((amax / 32767.0) * scale[None, :]).double()).float()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and 0 < rows <= INT8_GEMV_MAX_ROWS:
        k = cpu_kernels.kernels()
        if k is not None:
            y = k.gemv_int8(x.reshape(rows, -1).float().contiguous(), q, scale)
            return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])
    if x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu" and rows <= INT8PACK_MAX_ROWS:
        y = torch._weight_int8pack_mm(x.reshape(rows, -1).contiguous(), q, scale.to(x.dtype))
        return y.reshape(*x.shape[:-1], q.shape[0])
    # many rows (prefill): dequantising once and running the model dtype's GEMM is faster (measured 12.7 vs
    # 27.6 ms at 512 rows, 78 vs 222 ms at 4096, on a 3584x1024 matrix), and it is the twin itself
    return int8_linear_reference(x, q, scale)


class Int8(WeightFormat):
    """Symmetric int8 per output row: fields `qweight` int8 [..., N, K], `scale` fp32 [..., N]."""

    name = "int8"
    fields = ("qweight", "scale")

    @classmethod
    def quantize(cls, w: torch.Tensor, row_parts: list[int] | None = None) -> Tensors:
        q, scale = quantize_rows(w)  # per row: row groups need nothing of their own
        return {"qweight": q, "scale": scale}

    @classmethod
    def empty(cls, rows: list[int], in_features: int, experts: int | None = None,
              device: torch.device | str = "cpu") -> Tensors:
        lead = () if experts is None else (experts,)
        return {"qweight": torch.empty(*lead, sum(rows), in_features, dtype=torch.int8, device=device),
                "scale": torch.empty(*lead, sum(rows), dtype=torch.float32, device=device)}

    @classmethod
    def dequantize(cls, t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (t["qweight"].float() * t["scale"][..., None]).to(dtype)

    @classmethod
    def linear_reference(cls, x: torch.Tensor, t) -> torch.Tensor:
        return int8_linear_reference(x, t["qweight"], t["scale"])

    @classmethod
    def linear(cls, x: torch.Tensor, t) -> torch.Tensor:
        return int8_linear(x, t["qweight"], t["scale"])

    @classmethod
    def concat(cls, parts) -> tuple[Tensors, list[Tensors]]:
        q, qs = concat_rows([p["qweight"] for p in parts])
        scale = torch.cat([p["scale"] for p in parts])
        return ({"qweight": q, "scale": scale},
                [{"qweight": a, "scale": b} for a, b in zip(qs, scale.split([a.shape[0] for a in qs]), strict=True)])
