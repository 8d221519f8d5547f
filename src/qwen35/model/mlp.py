"""Feed-forward blocks: dense SwiGLU and the sparse MoE with a gated shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import TextConfig
from qwen35.ops import cpu_kernels
from qwen35.ops.experts import MOE_KERNEL_MAX_TOKENS, ExpertDispatch
from qwen35.ops.linear import Linear, linear, run_projections
from qwen35.parallel import TensorParallel


def _sharded(tp: TensorParallel | None) -> TensorParallel | None:
    return tp if tp is not None and tp.size > 1 else None


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int, tp: TensorParallel | None = None):
        """`inner`: this rank's share under tensor parallelism; `tp` sums down_proj's output (None: the caller
        sums it, as the MoE block does for its shared expert)."""
        super().__init__()
        self.tp = _sharded(tp)
        self.gate_proj = Linear(hidden, inner)
        self.up_proj = Linear(hidden, inner)
        self.down_proj = Linear(inner, hidden)

    def projection_parts(self) -> list[nn.Module]:
        return [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = run_projections(self, x, self.projection_parts())
        # in place on the projection's own output: a prompt's [T, inner] activations exist once, not three times
        h = F.silu(gate, inplace=True).mul_(up)
        return self.down_proj(h) if self.tp is None else self.tp.row_parallel(self.down_proj, h)


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over all experts in fp32, top-k, renormalised to sum 1 -> (weights [N, k], ids [N, k])."""
        logits = linear(x, self.weight)  # the GEMV kernel for decode rows (F.linear reads ~1 MB at ~12 GB/s)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return w.to(logits.dtype), ids


class Experts(ExpertDispatch):
    """Routed experts, stored fused as in BF16 checkpoints: gate_up_proj [E, 2I, H] (gate rows first),
    down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))

    def expert_linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return linear(x, getattr(self, name)[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.shape[0] <= MOE_KERNEL_MAX_TOKENS and x.dtype == torch.bfloat16
                and weights.dtype == torch.bfloat16 and self.gate_up_proj.dtype == torch.bfloat16
                and self.down_proj.dtype == torch.bfloat16):
            k = cpu_kernels.kernels()
            if k is not None:  # decode: every chosen expert in two parallel passes; the loop below is its twin
                return k.moe_experts_bf16(x, self.gate_up_proj, self.down_proj, ids, weights)
        return super().forward(x, weights, ids)


class SparseMoE(nn.Module):
    def __init__(self, cfg: TextConfig, tp: TensorParallel | None = None):
        """Under tensor parallelism (`cfg` this rank's share): the router is whole; the rank runs its experts
        [r*E/N, (r+1)*E/N) whole (expert parallelism) or its share of every expert; its share of the shared
        expert; and the sum of both over the ranks is one all-reduce."""
        super().__init__()
        self.tp = tp = _sharded(tp)
        H = cfg.hidden_size
        self.gate = Router(H, cfg.num_experts, cfg.num_experts_per_tok)
        self.expert_range = tp.part(cfg.num_experts) if tp is not None and tp.expert_parallel else None
        local = cfg.num_experts if self.expert_range is None else cfg.num_experts // tp.size
        self.experts = Experts(local, H, cfg.moe_intermediate_size)
        self.shared_expert = SwiGLU(H, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(H, 1)

    def _local_choices(self, weights: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert parallelism: the choices of this rank's experts, in its local ids. The others get weight 0
        and, for the dispatch loop, the id one past the last local expert (skipped); for the kernels (few
        tokens), local expert 0 (computed, weighted 0)."""
        a, b = self.expert_range
        local = ids - a
        mine = (local >= 0) & (local < b - a)
        other = 0 if n <= MOE_KERNEL_MAX_TOKENS else b - a
        return weights * mine, torch.where(mine, local, torch.full_like(local, other))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        if self.expert_range is not None:
            weights, ids = self._local_choices(weights, ids, x.shape[0])
        routed = self.experts(x, weights, ids)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        out = routed + shared
        return out if self.tp is None else self.tp.all_reduce(out)
