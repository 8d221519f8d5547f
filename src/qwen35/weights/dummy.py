"""Random weights for any config (`load_format="dummy"`): for benchmarks, tests and capacity planning.

Scales keep activations finite through any depth, and the GDN decay is realistic: per-head decay rates
spread from fast (forgets in a few tokens) to slow (remembers thousands), as in trained models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qwen35.model.deltanet import GatedDeltaNet
from qwen35.model.norm import RMSNorm, RMSNormGated


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def normal_(p: torch.Tensor, s: float) -> None:
        # Generate on CPU in chunks (the same numbers on any device), then copy.
        flat = p.view(-1)
        step = 1 << 24
        for i in range(0, flat.numel(), step):
            n = min(step, flat.numel() - i)
            flat[i:i + n].copy_(torch.randn(n, generator=gen) * s)

    for m in model.modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, RMSNorm):
            m.weight.zero_()  # zero-centred: scale is (1 + w)
        elif isinstance(m, (RMSNormGated, nn.LayerNorm)):
            m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        elif isinstance(m, GatedDeltaNet):
            m.A_log.copy_(torch.empty(m.A_log.shape).uniform_(1.0, 16.0, generator=gen).log())
            # dt log-uniform in [1e-3, 1e-1], stored as softplus^-1(dt): per-token decay exp(-A * dt).
            dt = torch.exp(torch.empty(m.dt_bias.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif isinstance(m, nn.Conv1d):  # the GDN short conv: a few taps of order one
            normal_(m.weight, 1.0 / math.sqrt(m.weight.shape[-1]))
        else:  # Linear, Embedding, Conv3d, router, fused experts
            for pname, p in own.items():
                if pname == "bias":
                    p.zero_()
                else:
                    normal_(p, std)
