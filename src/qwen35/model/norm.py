"""RMS norms of Qwen3.5."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.ops import cpu_kernels


def _kernels(x: torch.Tensor, weight: torch.Tensor):
    """The fused CPU norms when they apply (fp32 / bf16 with a matching weight). One pass instead of torch's
    six to eight: at 4K tokens the GDN output norm measured 26 ms against 77 ms, the RMSNorm 2.5 against 22."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return None
    return cpu_kernels.kernels()


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: y = x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32; weights stored near 0."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = _kernels(x, self.weight)
        if k is not None:
            return k.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class RMSNormGated(nn.Module):
    """GDN output norm: (w * rmsnorm(o)) * silu(z), plain weight initialised to 1."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        k = _kernels(gate, self.weight)
        if k is not None:
            D = x.shape[-1]
            xf = x.reshape(-1, D).float()  # the kernel rounds it to the model dtype itself, as reference() does
            return k.rms_norm_gated(xf, gate.reshape(-1, D), self.weight, self.eps).view(gate.shape)
        return self.reference(x, gate)

    def reference(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = gate.dtype  # the layer's activation dtype; the GDN output arrives in it (or is rounded to it)
        xf = x.to(dtype).float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        y = self.weight * y
        return (y * F.silu(gate.float())).to(dtype)
