"""Causal depthwise 1-D convolution with a carried window, followed by SiLU (the GDN short conv).

The window holds the last K-1 inputs of the sequence (oldest first), so a sequence split into pieces
gives the same output as one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.ops import cpu_kernels


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor | None = None):
    """Obviously-correct loop. x: [T, C], weight: [C, K], window: [C, K-1] or None (zeros)."""
    T, C = x.shape
    K = weight.shape[1]
    if window is None:
        window = x.new_zeros(C, K - 1)
    full = torch.cat([window.to(x.dtype), x.T], dim=1)  # [C, K-1+T]
    out = torch.empty_like(x)
    for t in range(T):
        out[t] = (full[:, t : t + K] * weight).sum(-1)
    return F.silu(out), full[:, full.shape[1] - (K - 1) :].clone()


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor | None = None):
    """Batched over equal-length sequences. x: [B, T, C], weight: [C, K], window: [B, C, K-1] or None.

    Returns (silu(conv(x)) [B, T, C], new window [B, C, K-1]).
    """
    B, T, C = x.shape
    K = weight.shape[1]
    k = cpu_kernels.kernels() if x.device.type == "cpu" and B == 1 and weight.dtype == x.dtype else None
    if k is not None and x.dtype in (torch.float32, torch.bfloat16) and T > 0:
        # fused kernel (csrc/conv.cpp); the torch code below is its twin
        win = window[0].to(x.dtype) if window is not None else x.new_zeros(0)
        y = k.causal_conv1d_silu(x[0], weight, win)
        if T >= K - 1:  # the last K-1 inputs
            new_window = x[0, T - (K - 1):].transpose(0, 1).contiguous()
        else:
            prev = win if window is not None else x.new_zeros(C, K - 1)
            new_window = torch.cat([prev, x[0].transpose(0, 1)], dim=1)[:, T:].contiguous()
        return y[None], new_window[None]
    xt = x.transpose(1, 2)
    if window is None:
        window = xt.new_zeros(B, C, K - 1)
    full = torch.cat([window.to(x.dtype), xt], dim=2)  # [B, C, K-1+T]
    out = F.conv1d(full.to(weight.dtype), weight[:, None, :], groups=C)  # [B, C, T]
    new_window = full[:, :, full.shape[2] - (K - 1) :].clone()
    return F.silu(out).transpose(1, 2).to(x.dtype), new_window


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """One decode step for B sequences; updates `window` [B, C, K-1] in place. x: [B, C] -> [B, C]."""
    full = torch.cat([window, x[:, :, None].to(window.dtype)], dim=2)  # [B, C, K]
    out = (full.to(weight.dtype) * weight).sum(-1)
    window.copy_(full[:, :, 1:])
    return F.silu(out).to(x.dtype)
