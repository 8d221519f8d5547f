"""Routing tokens to the experts they chose (the MoE dispatch loop), whatever format the experts are stored in.

This is the obviously-correct twin of the compiled MoE decode kernels (csrc/moe.cpp, csrc/fp8.cpp): the loop
transformers runs, one gather and two products per chosen expert. Storage formats (bf16 in `model/mlp.py`,
int8 and FP8 in `ops/quant/`) subclass it and say how to apply one expert's projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Token counts up to this run the routed experts in a compiled kernel (csrc/moe.cpp, csrc/fp8.cpp), whatever the
# format; larger batches (prefill) loop over the experts with one matrix product per expert, which the kernels'
# per-token reads would not beat.
MOE_KERNEL_MAX_TOKENS = 8


class ExpertDispatch(nn.Module):
    """Routes tokens to the experts they chose; only those experts run. Subclasses store the weights and
    say how to apply expert `e`'s `gate_up_proj` / `down_proj` (`expert_linear`)."""

    num_experts: int

    def expert_linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        N, k = ids.shape
        out = torch.zeros_like(x)
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // k
        w_sorted = weights.reshape(-1)[order]
        start = 0
        for e, c in enumerate(counts):
            if e >= self.num_experts:  # "another rank's expert" (expert parallelism: model/mlp.py), sorted last
                break
            if c == 0:
                continue
            tok = token_of[start : start + c]
            gate, up = self.expert_linear("gate_up_proj", e, x[tok]).chunk(2, dim=-1)
            y = self.expert_linear("down_proj", e, F.silu(gate) * up) * w_sorted[start : start + c, None]
            out.index_add_(0, tok, y.to(out.dtype))
            start += c
        return out
