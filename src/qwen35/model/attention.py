"""Gated full attention: q/k norms, partial M-RoPE, GQA softmax attention, sigmoid output gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import TextConfig
from qwen35.model.cache import ForwardBatch
from qwen35.model.norm import RMSNorm
from qwen35.model.rope import apply_rotary
from qwen35.ops import cpu_kernels
from qwen35.ops.linear import Linear, run_projections
from qwen35.parallel import TensorParallel

# Chunks of at least this many queries use the compiled flash-attention kernel on CPU (bf16 dot products: ~2x
# torch's SDPA at 4K tokens on the 0.8B shape); fewer go to SDPA.
PREFILL_KERNEL_MIN_QUERIES = 16
SDPA_QUERY_BLOCK = 64  # queries per SDPA call beyond our prefill kernel (see attend)


def paged_indices(block_table: list[int], start: int, end: int, block_size: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset in block) of token positions [start, end) of one sequence (`HybridCache.kv_index` turns
    them into an index of the pools)."""
    pos = torch.arange(start, end, device=device)
    table = torch.as_tensor(block_table, dtype=torch.long, device=device)
    return table[pos // block_size], pos % block_size


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    """Causal GQA attention of n new queries at positions [context_len, context_len + n) over L keys.

    q: [n, Hq, D], k/v: [L, Hkv, D] -> [n, Hq, D]
    """
    n, L = q.shape[0], k.shape[0]
    if (n >= PREFILL_KERNEL_MIN_QUERIES and q.device.type == "cpu" and context_len + n == L and q.shape[-1] % 64 == 0
            and q.dtype == k.dtype == v.dtype == torch.bfloat16):
        ops = cpu_kernels.kernels()
        if ops is not None and ops.prefill_attention_supported():  # csrc/attention_prefill.cpp; SDPA is its twin
            return ops.prefill_attention(q, k, v, scale)
    if n > SDPA_QUERY_BLOCK:
        # in blocks of queries on the absolute-position grid: SDPA's CPU kernel splits the queries by a size that
        # depends on their count, and a row's sums with it, so a prompt's rows would differ (in the last bits)
        # from the same rows of a longer prompt, and a prefix-cache snapshot from the uncached state
        cuts = [0, *range(SDPA_QUERY_BLOCK - context_len % SDPA_QUERY_BLOCK, n, SDPA_QUERY_BLOCK), n]
        cuts = sorted(set(cuts))
        return torch.cat([_sdpa(q[a:b], k[:context_len + b], v[:context_len + b], context_len + a, scale)
                          for a, b in zip(cuts, cuts[1:], strict=False)])
    return _sdpa(q, k, v, context_len, scale)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    n, L = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    gqa = q.shape[1] != k.shape[1]
    if context_len == 0 and n == L:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        query_pos = context_len + torch.arange(n, device=q.device)
        allowed = torch.arange(L, device=q.device)[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


class GatedAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, tp: TensorParallel | None = None):
        """`cfg`: this rank's share under tensor parallelism (parallel/layout.py); `tp` sums o_proj's output."""
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        H, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(H, self.num_heads * D * 2)  # per head: [query | gate]
        self.k_proj = Linear(H, self.num_kv_heads * D)
        self.v_proj = Linear(H, self.num_kv_heads * D)
        self.o_proj = Linear(self.num_heads * D, H)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.scale = D**-0.5

    def projection_parts(self) -> list[nn.Module]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        N = x.shape[0]
        D = self.head_dim
        qg, k, v = run_projections(self, x, self.projection_parts())
        qg = qg.view(N, self.num_heads, 2 * D)
        q, gate = qg[..., :D], qg[..., D:].reshape(N, -1)
        q = self.q_norm(q)
        k = self.k_norm(k.reshape(N, self.num_kv_heads, D))
        v = v.reshape(N, self.num_kv_heads, D)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        cache = batch.cache
        out = torch.empty(N, self.num_heads, D, dtype=q.dtype, device=x.device)
        done: set[int] = set()
        plan = batch.decode
        k_ops = cpu_kernels.kernels() if plan is not None and x.device.type == "cpu" else None
        if k_ops is not None:  # one-token sequences (decodes) attend straight from the paged pool, together
            rows = plan.rows
            kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
            kc[plan.kv_index] = k[rows].to(kc.dtype)
            vc[plan.kv_index] = v[rows].to(vc.dtype)
            out[rows] = k_ops.paged_attention_decode(q[rows], kc, vc, plan.block_tables, plan.context_lens,
                                                     self.scale).to(q.dtype)
            done = set(plan.seqs)
        for i in range(batch.num_seqs):
            s, e = batch.starts[i], batch.starts[i + 1]
            if s == e or i in done:
                continue
            ctx = batch.context_lens[i]
            if cache is None:
                keys, values = k[s:e], v[s:e]
            else:
                kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
                table = batch.block_tables[i]
                where = cache.kv_index(*paged_indices(table, ctx, ctx + (e - s), cache.block_size, x.device))
                kc[where] = k[s:e].to(kc.dtype)
                vc[where] = v[s:e].to(vc.dtype)
                if ctx == 0:
                    keys, values = k[s:e], v[s:e]
                else:
                    where = cache.kv_index(*paged_indices(table, 0, ctx + (e - s), cache.block_size, x.device))
                    keys, values = kc[where].to(q.dtype), vc[where].to(q.dtype)
            out[s:e] = attend(q[s:e], keys, values, ctx, self.scale)
        out = out.reshape(N, -1)
        out = out * torch.sigmoid(gate)
        return self.o_proj(out) if self.tp is None else self.tp.row_parallel(self.o_proj, out)
