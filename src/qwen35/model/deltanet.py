"""Gated DeltaNet (linear attention) layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import TextConfig
from qwen35.model.cache import ForwardBatch
from qwen35.model.norm import RMSNormGated
from qwen35.ops import causal_conv1d, causal_conv1d_step, cpu_kernels, gated_delta_step
from qwen35.ops.gated_delta import gated_delta_rule_prefill, l2_normalize
from qwen35.ops.linear import Linear, run_projections
from qwen35.parallel import TensorParallel


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, tp: TensorParallel | None = None):
        """`cfg`: this rank's share under tensor parallelism (its key-head group); `tp` sums out_proj's output."""
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.layer_idx = layer_idx
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.Hk * self.dk, self.Hv * self.dv
        self.conv_dim = cfg.conv_dim
        H = cfg.hidden_size
        self.in_proj_qkv = Linear(H, self.conv_dim)  # rows q | k | v
        self.in_proj_z = Linear(H, self.value_dim)
        self.in_proj_b = Linear(H, self.Hv)
        self.in_proj_a = Linear(H, self.Hv)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.linear_conv_kernel_dim, groups=self.conv_dim,
                                bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.Hv))
        self.A_log = nn.Parameter(torch.zeros(self.Hv))
        self.norm = RMSNormGated(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, H)

    def projection_parts(self) -> list[nn.Module]:
        return [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a]

    def _qkv_heads(self, mixed: torch.Tensor):
        """Split conv output [n, C] into fp32 q, k (normalised, q scaled, repeated to Hv heads) and v (in the
        conv's dtype). Decode's torch twin uses it; the prefill kernel normalises q and k itself."""
        n = mixed.shape[0]
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalize(q.view(n, self.Hk, self.dk), scale=self.dk**-0.5)
        k = l2_normalize(k.view(n, self.Hk, self.dk))
        rep = self.Hv // self.Hk
        if rep > 1:
            q, k = q.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
        return q, k, v.view(n, self.Hv, self.dv)

    def _window_before(self, inputs: torch.Tensor, o: int, window: torch.Tensor | None) -> torch.Tensor:
        """The conv window [C, K-1] (raw inputs, oldest first) after the first `o` rows of `inputs` [n, C],
        which followed `window` ([1, C, K-1]; None: zeros, a sequence at position 0)."""
        keep = self.conv1d.weight.shape[-1] - 1
        if o >= keep:
            return inputs[o - keep:o].transpose(0, 1)
        before = window[0] if window is not None else inputs.new_zeros(inputs.shape[1], keep)
        return torch.cat([before[:, o:], inputs[:o].transpose(0, 1)], dim=1)

    def _decode_rows(self, k_ops, mixed, a_lin, b_lin, g, beta, weight, conv_pool, state_pool, rows, slots,
                     fresh, src=None) -> torch.Tensor:
        """One recurrent step for the decode `rows` (one per slot), from the window and state in `src` (default:
        their own slots) into their slots: the fused kernel, or its torch twin (what tests hold the kernel to)."""
        if k_ops is not None:
            return k_ops.gdn_decode_step(mixed[rows].contiguous(), weight, conv_pool, state_pool, slots, fresh,
                                         a_lin[rows].contiguous(), b_lin[rows].contiguous(), self.A_log.float(),
                                         self.dt_bias.float(), self.Hk, self.dk, src)
        device = mixed.device
        rows, slots, fresh = rows.to(device), slots.to(device), fresh.to(device)
        read = slots if src is None else src.to(device)
        window, state = conv_pool[read], state_pool[read]
        if bool(fresh.any()):  # a sequence at position 0 starts from zero state, whatever its slot held
            window[fresh] = 0
            state[fresh] = 0
        conv_out = causal_conv1d_step(mixed[rows], weight, window)
        q, k, v = self._qkv_heads(conv_out)
        o = gated_delta_step(q, k, v.float(), g[rows], beta[rows], state)
        conv_pool[slots] = window
        state_pool[slots] = state
        return o

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        N = x.shape[0]
        mixed, z, b_lin, a_lin = run_projections(self, x, self.projection_parts())
        plan = batch.decode
        k_ops = cpu_kernels.kernels() if plan is not None and x.device.type == "cpu" else None
        beta = g = None
        if k_ops is None or N > plan.rows.numel():  # the fused decode kernel computes its gates itself
            beta = torch.sigmoid(b_lin).float()
            g = -self.A_log.float().exp() * F.softplus(a_lin.float() + self.dt_bias.float())
        weight = self.conv1d.weight[:, 0, :]  # [C, K]
        cache = batch.cache
        conv_pool = cache.conv[self.layer_idx] if cache is not None else None
        state_pool = cache.recurrent[self.layer_idx] if cache is not None else None
        out = torch.empty(N, self.Hv, self.dv, dtype=torch.float32, device=x.device)

        # Sequences bringing one token over a cache (decodes) share one batched recurrent step; the others
        # (prefill chunks) run the chunked form one by one. Chained decodes (speculative verification) run in
        # rounds: row j of every chain after row j - 1, from the state that row left in its own slot.
        if plan is not None:
            for sel in plan.rounds or [None]:
                if sel is None:
                    rows, slots, fresh, src = plan.rows, plan.slots, plan.fresh, None
                else:
                    rows, slots, fresh, src = plan.rows[sel], plan.slots[sel], plan.fresh[sel], plan.src_slots[sel]
                out[rows] = self._decode_rows(k_ops, mixed, a_lin, b_lin, g, beta, weight, conv_pool, state_pool,
                                              rows, slots, fresh, src)
        # Prompts (prefill chunks): every conv first, so that the projection's output is let go before the
        # recurrences (on a 1K-token prompt of the 0.8B that is 12.6 MB less at the layer's peak).
        done = set(plan.seqs) if plan is not None else set()
        pieces = []
        for i in range(batch.num_seqs):
            s, e = batch.starts[i], batch.starts[i + 1]
            if s == e or i in done:
                continue
            fresh = cache is None or batch.context_lens[i] == 0
            slot = None if cache is None else batch.slots[i]
            window = None if fresh else conv_pool[slot][None]
            state = None if fresh else state_pool[slot][None]
            conv_out, new_window = causal_conv1d(mixed[None, s:e], weight, window)
            # the prefix cache's snapshots (the state after some of the new tokens) take the conv window there
            cuts = batch.snapshots.get(i, []) if batch.snapshots else []
            for b, snap in cuts:
                conv_pool[snap] = self._window_before(mixed[s:e], b, window)
            if cache is not None:
                conv_pool[slot] = new_window[0]
            pieces.append((s, e, slot, conv_out[0], state, cuts))
        del mixed
        for s, e, slot, conv_out, state, cuts in pieces:
            n = e - s
            q, k, v = conv_out.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
            q, k = q.view(1, n, self.Hk, self.dk), k.view(1, n, self.Hk, self.dk)  # normalised in there
            v = v.view(1, n, self.Hv, self.dv)
            # the prompt in pieces where the prefix cache wants the state (snapshots: after o new tokens); pieces
            # that start on the kernel's chunk grid compute exactly what one call over the whole would
            a = 0
            for b, snap in [*cuts, (n, None)]:
                _, state = gated_delta_rule_prefill(q[:, a:b], k[:, a:b], v[:, a:b], g[None, s + a:s + b],
                                                    beta[None, s + a:s + b], state, out=out[None, s + a:s + b],
                                                    l2norm_eps=1e-6, q_scale=self.dk**-0.5)
                if snap is not None:
                    state_pool[snap] = state[0]
                a = b
            if cache is not None:
                state_pool[slot] = state[0]
            del conv_out, q, k, v  # a prompt's conv output is not held through the norm and out_proj
        pieces.clear()

        o = self.norm(out, z.view(N, self.Hv, self.dv))  # fp32 out: the norm rounds it to x's dtype
        o = o.reshape(N, self.value_dim)
        return self.out_proj(o) if self.tp is None else self.tp.row_parallel(self.out_proj, o)
