"""Linear layers for decoding: a bandwidth-bound bf16 GEMV kernel on CPU, with `F.linear` as the
obviously-correct twin.

Decoding multiplies a few activation rows by every weight matrix, so its speed is the memory
bandwidth. PyTorch's bf16 `linear` for a handful of rows runs far below it on CPU (measured ~1-2 GB/s on
mid-size matrices vs ~30 GB/s of DRAM bandwidth), so for up to `GEMV_MAX_ROWS` rows on CPU we call our
own kernel (csrc/gemv.cpp, compiled on first use for this machine). Larger batches (prefill) stay on
`F.linear`, which is compute-bound and already uses oneDNN. Set QWEN35_CPU_KERNELS=0 to disable.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("qwen35")

GEMV_MAX_ROWS = 8
_lock = threading.Lock()
_kernels: ModuleType | None = None
_tried = False
_enabled = os.environ.get("QWEN35_CPU_KERNELS", "1") != "0"


def set_cpu_kernels(enabled: bool) -> bool:
    """Switch the fast CPU path on or off (tests hold both paths together); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def cpu_kernels() -> ModuleType | None:
    """The compiled CPU kernels, or None (disabled, or the compiler failed: logged once)."""
    global _kernels, _tried
    if _tried:
        return _kernels
    with _lock:
        if _tried:
            return _kernels
        try:
            from torch.utils.cpp_extension import load

            src = Path(__file__).parent / "csrc" / "gemv.cpp"
            _kernels = load(name="qwen35_cpu_kernels", sources=[str(src)],
                            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler / ninja: the twin (F.linear) still gives the same numbers
            log.warning("qwen35: CPU kernels unavailable, decoding uses torch's linear (slower): %s", e)
            _kernels = None
        _tried = True
        return _kernels


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T. `out_dtype` defaults to x's dtype (fp32 accumulation either way)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (0 < rows <= GEMV_MAX_ROWS and x.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.is_contiguous() and weight.dim() == 2 and _enabled):
        k = cpu_kernels()
        if k is not None:
            x2 = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
            y = k.gemv_bf16(x2, weight)
            return y.to(out_dtype or x.dtype).reshape(*x.shape[:-1], weight.shape[0])
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
