"""Linear layers for decoding: a bandwidth-bound bf16 GEMV kernel on CPU, with `F.linear` as the
obviously-correct twin.

Decoding multiplies a few activation rows by every weight matrix, so its speed is the memory
bandwidth. PyTorch's bf16 `linear` for a handful of rows runs far below it on CPU (measured ~1-2 GB/s on
mid-size matrices vs ~30 GB/s of DRAM bandwidth), so for up to `GEMV_MAX_ROWS` rows on CPU we call our
own kernel (csrc/gemv.cpp, compiled on first use for this machine). Larger batches (prefill) stay on
`F.linear`, which is compute-bound and already uses oneDNN. Set QWEN35_CPU_KERNELS=0 to disable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.ops import cpu_kernels as _ck

GEMV_MAX_ROWS = 32  # decode batches up to this many rows stay on the bandwidth-bound kernel
set_cpu_kernels = _ck.set_enabled


def cpu_kernels():
    """The compiled kernels (built on first use), or None where they cannot be built."""
    return _ck.build()


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T. `out_dtype` defaults to x's dtype (fp32 accumulation either way)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (0 < rows <= GEMV_MAX_ROWS and x.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.is_contiguous() and weight.dim() == 2):
        k = _ck.kernels()
        if k is not None:
            x2 = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
            want = out_dtype or x.dtype
            y = k.gemv_bf16(x2, weight, want == torch.bfloat16)
            return (y if y.dtype == want else y.to(want)).reshape(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight)
    return y if out_dtype is None else y.to(out_dtype)


class Linear(nn.Linear):
    """nn.Linear (no bias) whose forward uses `linear`: same parameters, same names, same results."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        if bias:
            raise ValueError("qwen35.ops.linear.Linear has no bias")
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
