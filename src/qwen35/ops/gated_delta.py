"""The gated delta rule (Gated DeltaNet's token mixer).

Per value head, with state S of shape [dk, dv] (fp32):

    S = exp(g_t) * S
    S = S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t = S^T q_t

Inputs here are already prepared by the layer: q and k L2-normalised, q scaled by dk^-0.5, and q/k
heads repeated so that every tensor has the same head count H (= the number of value heads).

Shapes (a leading batch dim B of equal-length sequences):
    q, k: [B, T, H, dk]   v: [B, T, H, dv]   g, beta: [B, T, H]   state: [B, H, dk, dv] (fp32)
Every function returns (o [B, T, H, dv] in fp32, final state [B, H, dk, dv] in fp32).

Three forms that must agree: `gated_delta_rule_naive` (the equations, token by token, obviously
correct), `gated_delta_rule_recurrent` (the same loop over batched step calls, used for decode) and
`gated_delta_rule_chunked` (the UT/WY chunked form, used for prefill).
"""

from __future__ import annotations

import torch


def _initial_state(state: torch.Tensor | None, b: int, h: int, dk: int, dv: int, device) -> torch.Tensor:
    if state is None:
        return torch.zeros(b, h, dk, dv, dtype=torch.float32, device=device)
    return state.to(torch.float32).clone()


def gated_delta_rule_naive(q, k, v, g, beta, state=None):
    """Reference: the recurrence written out per batch, token and head with plain matrix algebra."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    S = _initial_state(state, B, H, dk, dv, k.device)
    q, k, v, g, beta = (x.to(torch.float32) for x in (q, k, v, g, beta))
    out = torch.zeros(B, T, H, dv, dtype=torch.float32, device=k.device)
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(T):
                s = torch.exp(g[b, t, h]) * s
                kt, vt = k[b, t, h], v[b, t, h]
                u = beta[b, t, h] * (vt - s.T @ kt)
                s = s + torch.outer(kt, u)
                out[b, t, h] = s.T @ q[b, t, h]
            S[b, h] = s
    return out, S


def gated_delta_step(q, k, v, g, beta, state):
    """One decode step for B sequences, updating `state` in place.

    q, k: [B, H, dk]  v: [B, H, dv]  g, beta: [B, H]  state: [B, H, dk, dv] fp32.  Returns o [B, H, dv] fp32.
    """
    q, k, v, g, beta = (x.to(torch.float32) for x in (q, k, v, g, beta))
    state.mul_(torch.exp(g)[..., None, None])
    predicted = torch.einsum("bhkv,bhk->bhv", state, k)
    update = beta[..., None] * (v - predicted)
    state.add_(k[..., :, None] * update[..., None, :])
    return torch.einsum("bhkv,bhk->bhv", state, q)


def gated_delta_rule_recurrent(q, k, v, g, beta, state=None):
    """Token-by-token loop over `gated_delta_step`, batched over sequences and heads."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    S = _initial_state(state, B, H, dk, dv, k.device)
    out = torch.empty(B, T, H, dv, dtype=torch.float32, device=k.device)
    for t in range(T):
        out[:, t] = gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
    return out, S


def unit_lower_inverse(a: torch.Tensor, base: int = 16) -> torch.Tensor:
    """(I + a)^-1 for strictly lower-triangular a [..., C, C].

    Recursive block inversion: with a = [[a11, 0], [a21, a22]],
        T = [[T11, 0], [-T22 a21 T11, T22]],  T11 = (I + a11)^-1, T22 = (I + a22)^-1,
    the two diagonal halves inverted together as one batch; blocks of `base` or fewer rows by forward
    substitution (row i of T is e_i - sum_{j<i} a_ij T_j). Far fewer, larger ops than substitution over all
    rows, and much faster on CPU than the per-matrix LAPACK calls of `torch.linalg.solve_triangular`.
    (A product formula over powers of a would be faster still, but its intermediate terms grow like
    binomial coefficients for correlated keys: not stable in fp32.)
    """
    C = a.shape[-1]
    if C <= base or C % 2:
        t = torch.zeros_like(a)
        for i in range(1, C):
            row = a[..., i:i + 1, :i]
            t[..., i:i + 1, :i] = -(row + row @ t[..., :i, :i])
        return t + torch.eye(C, dtype=a.dtype, device=a.device)
    h = C // 2
    halves = unit_lower_inverse(torch.stack([a[..., :h, :h], a[..., h:, h:]], dim=-3), base)
    t11, t22 = halves[..., 0, :, :], halves[..., 1, :, :]
    t = torch.zeros_like(a)
    t[..., :h, :h] = t11
    t[..., h:, h:] = t22
    t[..., h:, :h] = -(t22 @ (a[..., h:, :h] @ t11))
    return t


def gated_delta_rule_chunked(q, k, v, g, beta, state=None, chunk_size: int = 32, out=None):
    """Chunked (UT/WY) form: the recurrence over chunks of `chunk_size` tokens, matmuls inside a chunk.

    Within a chunk, with gamma_i the cumulative log decay up to position i and S0 the state entering it,
    the corrections u_i = beta_i (v_i - (decayed state at i)^T k_i) satisfy a unit lower-triangular system
        u_i + sum_{j<i} beta_i (k_i . k_j) e^{gamma_i - gamma_j} u_j = beta_i v_i - beta_i e^{gamma_i} k_i^T S0,
    and then  o_i = e^{gamma_i} q_i^T S0 + sum_{j<=i} (q_i . k_j) e^{gamma_i - gamma_j} u_j,
              S_end = e^{gamma_C} S0 + sum_j e^{gamma_C - gamma_j} k_j u_j^T.
    All exponents are <= 0, so nothing overflows.

    `out` (optional, [B, T, H, dv] of any float dtype): where to write the output (it is also returned), which
    saves a copy when the caller has a buffer.
    """
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    S = _initial_state(state, B, H, dk, dv, k.device)
    if T == 0:
        return (torch.zeros(B, 0, H, dv, dtype=torch.float32, device=k.device) if out is None else out), S
    C = chunk_size
    n_chunks = -(-T // C)
    pad = n_chunks * C - T

    BH = B * H

    def chunk_major(x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, ...] -> [N, B*H, C, ...] fp32, contiguous: each chunk's slice is one contiguous block
        (batched matmuls on it need no copies). Padded steps are zeros: g = 0 (no decay), beta = 0 (no write).
        One pass: the conversion and the new layout are a single copy into the destination."""
        tail = x.shape[3:]
        dst = (torch.zeros if pad else torch.empty)(n_chunks, B, H, C, *tail, dtype=torch.float32, device=x.device)
        view = dst.permute(1, 0, 3, 2, *range(4, 4 + len(tail)))  # [B, N, C, H, ...]
        full = T // C
        if full:
            view[:, :full].copy_(x[:, :full * C].reshape(B, full, C, H, *tail))
        if pad:
            view[:, full, :T - full * C].copy_(x[:, full * C:])
        return dst.reshape(n_chunks, BH, C, *tail)

    q, k, v, g, beta = (chunk_major(x) for x in (q, k, v, g, beta))
    S = S.reshape(BH, dk, dv)

    gamma = g.cumsum(-1)  # [N, BH, C]
    lower_incl = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    # decay[i, j] = exp(gamma_i - gamma_j) for j <= i, else 0
    diff = gamma[..., :, None] - gamma[..., None, :]
    decay = torch.where(lower_incl, diff, torch.full_like(diff, float("-inf"))).exp()

    kk = k @ k.transpose(-1, -2)
    strict = decay.masked_fill(torch.eye(C, dtype=torch.bool, device=k.device), 0.0)
    inverse = unit_lower_inverse(beta[..., :, None] * kk * strict)
    rhs_v = beta[..., None] * v
    rhs_k = (beta * gamma.exp())[..., None] * k
    u_base, w = inverse @ rhs_v, inverse @ rhs_k  # u = u_base - w @ S0

    attn = (q @ k.transpose(-1, -2)).mul_(decay)  # intra-chunk scores, causal incl. diagonal
    q_decayed = q.mul_(gamma.exp()[..., None])  # e^{gamma} q reads S0 for the output (q is ours: chunk_major)
    k_to_end_t = (k * (gamma[..., -1:] - gamma).exp()[..., None]).transpose(-1, -2)  # bmm reads it as is
    chunk_decay = gamma[..., -1].exp()[..., None, None]  # [N, BH, 1, 1]

    # The sequential part, written so that every product lands in its destination (no temporaries):
    #   u = u_base - w S;  o = e^{gamma} q S + attn u;  S = e^{gamma_C} S + (k e^{gamma_C - gamma})^T u
    chunks = torch.empty(n_chunks, BH, C, dv, dtype=torch.float32, device=k.device)
    for n in range(n_chunks):
        u = torch.baddbmm(u_base[n], w[n], S, alpha=-1.0)
        torch.bmm(q_decayed[n], S, out=chunks[n])
        chunks[n].baddbmm_(attn[n], u)
        S.mul_(chunk_decay[n]).baddbmm_(k_to_end_t[n], u)  # S is ours (a clone or zeros)
    tokens = chunks.reshape(n_chunks, B, H, C, dv).permute(1, 0, 3, 2, 4).reshape(B, n_chunks * C, H, dv)[:, :T]
    if out is None:
        return tokens.contiguous(), S.reshape(B, H, dk, dv)
    out.copy_(tokens)
    return out, S.reshape(B, H, dk, dv)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6, scale: float = 1.0) -> torch.Tensor:
    """fp32 x / sqrt(|x|^2 + eps) * scale for x of any float dtype. The squared norm is taken in fp32 without
    materialising an fp32 copy, and the scale joins the per-row factor: one pass over x writes the result."""
    sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_()
    return x.to(torch.float32, copy=True).mul_(torch.rsqrt(sq + eps) * scale)  # fp32 in place: no mixed-dtype op


def gated_delta_rule_prefill(q, k, v, g, beta, state=None, chunk_size: int = 32, out=None,
                             l2norm_eps: float | None = None, q_scale: float = 1.0):
    """The chunked form for a prompt, with grouped heads: q, k [B, T, Hk, dk] where value head h reads q/k head
    h // (H / Hk) (no repeated copies). With `l2norm_eps`, q and k are raw (any float dtype, e.g. slices of the
    conv output) and are L2-normalised here, q also scaled by `q_scale` (`l2_normalize`); without, they are
    taken as given. On CPU this runs the compiled kernel (csrc/gdn_prefill.cpp, one task per head with its
    working set in cache, normalising rows as it loads them); elsewhere, or without the kernels, it normalises,
    repeats the heads and runs `gated_delta_rule_chunked`, its twin.
    Returns (o [B, T, H, dv] fp32, final state [B, H, dk, dv] fp32)."""
    from qwen35.ops import cpu_kernels

    B, T, Hk, dk = k.shape
    H, dv = v.shape[2], v.shape[3]
    ops = cpu_kernels.kernels() if k.device.type == "cpu" else None
    if (ops is not None and T > 0 and dk % 16 == 0 and dv % 16 == 0 and chunk_size % 16 == 0
            and v.dtype in (torch.float32, torch.bfloat16)):
        S = (torch.zeros(B, H, dk, dv, dtype=torch.float32, device=k.device) if state is None
             else state.to(torch.float32).contiguous().clone())
        dst = out if out is not None and out.dtype == torch.float32 else torch.empty(
            B, T, H, dv, dtype=torch.float32, device=k.device)
        if l2norm_eps is None or q.dtype not in (torch.float32, torch.bfloat16) or k.dtype != q.dtype:
            if l2norm_eps is not None:
                q, k = l2_normalize(q, l2norm_eps, q_scale), l2_normalize(k, l2norm_eps)
            q, k, eps = q.float(), k.float(), -1.0
        else:
            eps = l2norm_eps
        ops.gdn_chunked_prefill(q, k, v, g.float(), beta.float(), S, dst, chunk_size, eps, q_scale)
        if out is not None and dst is not out:
            out.copy_(dst)
        return dst, S
    if l2norm_eps is not None:
        q, k = l2_normalize(q, l2norm_eps, q_scale), l2_normalize(k, l2norm_eps)
    rep = H // Hk
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    return gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size=chunk_size, out=out)
