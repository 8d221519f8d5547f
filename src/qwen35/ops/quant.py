"""Weight-only int8 quantisation (`quantization="int8"`): int8 weights, one fp32 scale per output row.

Decoding reads half the bytes of bf16. Few rows (decode) go through the int8 GEMV kernel; many rows
(prefill) through torch's int8-weight matmul; `int8_linear_reference` (dequantise, then F.linear) is the
obviously-correct twin they are both tested against. Where the CPU has AVX512-VNNI the kernel also rounds
each activation row to int16 (its own scale) and multiplies in integers; `int8_gemv_reference` is exactly
that computation, and its distance to `int8_linear_reference` is bounded in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.model.mlp import ExpertDispatch
from qwen35.ops import cpu_kernels
from qwen35.ops.hugepages import advise_hugepages

INT8_GEMV_MAX_ROWS = 32  # the int8 kernel's limit (torch has no fast few-row int8 product to hand over to)
INT8PACK_MAX_ROWS = 256  # above this, dequantise + F.linear (see int8_linear)

# Linear layers kept in full precision: tiny, or feeding sensitive gates (as FP8 checkpoints keep them).
KEEP = ("in_proj_a", "in_proj_b", "shared_expert_gate")


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


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale)


class Int8Experts(ExpertDispatch):
    """Fused experts with int8 storage: same routing and maths as `Experts`, half the bytes."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        for name in ("gate_up_proj", "down_proj"):
            q, scale = quantize_rows(getattr(experts, name).data)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)
        self.num_experts = q.shape[0]

    def expert_linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e])


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's Linear layers (and MoE experts) by int8 versions in place. Embeddings, norms,
    routers and the tiny gate projections stay as they are. A tied head gets its own int8 copy."""
    from qwen35.model.mlp import Experts
    from qwen35.ops.linear import Linear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and name not in KEEP:
                setattr(parent, name, Int8Linear(child.weight.data))
            elif isinstance(child, Experts):
                setattr(parent, name, Int8Experts(child))
    if getattr(model, "lm_head", "absent") is None:  # tied: quantise a copy, keep the embedding exact
        model.lm_head = Int8Linear(model.model.embed_tokens.weight.data)
    model.quantization = "int8"
    return model
