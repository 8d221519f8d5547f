"""Rotary position embedding of the text model: partial (first rotary_dim dims), rotate-half style,
interleaved M-RoPE over (T, H, W) positions, optional YaRN."""

from __future__ import annotations

import math

import torch
from torch import nn

from qwen35.config import TextConfig


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def yarn_inv_freq(cfg: TextConfig) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies by `factor`, keep high ones, blend in between;
    cos/sin are scaled by 0.1 * ln(factor) + 1."""
    r = cfg.rope
    dim = cfg.rotary_dim
    factor = r.factor
    orig = r.original_max_position_embeddings or cfg.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if r.attention_factor is not None:
        attention = float(r.attention_factor)
    elif r.mscale and r.mscale_all_dim:
        attention = mscale(factor, r.mscale) / mscale(factor, r.mscale_all_dim)
    else:
        attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original (extrapolated) frequency
    pos_freqs = r.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv, attention


class MRotaryEmbedding(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.rotary_dim // 2), persistent=False)
        self.register_buffer("axis", torch.zeros(cfg.rotary_dim // 2, dtype=torch.long), persistent=False)
        self.scale = 1.0
        if self.inv_freq.device.type != "meta":
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute the (non-persistent) tables; call again after `to_empty()` from the meta device."""
        cfg = self.cfg
        dim = cfg.rotary_dim
        if cfg.rope.rope_type == "yarn":
            inv, scale = yarn_inv_freq(cfg)
        else:
            inv, scale = default_inv_freq(cfg.rope.theta, dim), 1.0
        device = self.inv_freq.device
        self.inv_freq = inv.to(device)
        self.scale = scale
        # Which position axis (0=T, 1=H, 2=W) drives each frequency j: interleaved M-RoPE.
        sec = cfg.rope.mrope_section
        axis = torch.zeros(dim // 2, dtype=torch.long)
        for j in range(dim // 2):
            if j % 3 == 1 and j < 3 * sec[1]:
                axis[j] = 1
            elif j % 3 == 2 and j < 3 * sec[2]:
                axis[j] = 2
        self.axis = axis.to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [3, N] (T, H, W) -> cos, sin: [N, rotary_dim]."""
        pos = positions.to(self.inv_freq.device).float()  # [3, N]
        freqs = pos[:, :, None] * self.inv_freq  # [3, N, dim/2]
        freqs = freqs.gather(0, self.axis.view(1, 1, -1).expand(1, freqs.shape[1], -1)).squeeze(0)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, head_dim]; cos/sin: [N, rd]. Rotate-half on the first rd dims, rest unchanged."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, xp], dim=-1)
