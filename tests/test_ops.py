"""The gated delta rule's three forms agree; the causal conv's fast forms equal its loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen35.ops import (
    causal_conv1d,
    causal_conv1d_reference,
    causal_conv1d_step,
    gated_delta_rule_chunked,
    gated_delta_rule_naive,
    gated_delta_rule_recurrent,
)
from qwen35.ops.gated_delta import gated_delta_rule_prefill, l2_normalize


def random_inputs(B, T, H, dk, dv, seed=0, slow=True):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1) * dk**-0.5
    k = F.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1)
    v = torch.randn(B, T, H, dv, generator=g)
    decay = -torch.rand(B, T, H, generator=g) * (0.02 if slow else 2.0)
    beta = torch.rand(B, T, H, generator=g)
    return q, k, v, decay, beta


@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent_equals_naive(T, with_state):
    B, H, dk, dv = 2, 3, 8, 6
    q, k, v, g, beta = random_inputs(B, T, H, dk, dv, seed=T)
    S0 = torch.randn(B, H, dk, dv) if with_state else None
    o_ref, s_ref = gated_delta_rule_naive(q, k, v, g, beta, S0)
    o_rec, s_rec = gated_delta_rule_recurrent(q, k, v, g, beta, S0)
    o_chk, s_chk = gated_delta_rule_chunked(q, k, v, g, beta, S0, chunk_size=64)
    for o, s in ((o_rec, s_rec), (o_chk, s_chk)):
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    if S0 is not None:
        assert not torch.equal(S0, s_ref)  # the input state is not modified in place


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_in_pieces_equals_whole(chunk):
    """Carrying the state between calls splits a sequence anywhere, including mid-chunk."""
    q, k, v, g, beta = random_inputs(1, 200, 2, 8, 8, seed=3)
    o_all, s_all = gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=chunk)
    state, outs = None, []
    for a, b in [(0, 37), (37, 64), (64, 65), (65, 200)]:
        o, state = gated_delta_rule_chunked(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], state,
                                            chunk_size=chunk)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_all, rtol=1e-5, atol=1e-5)


def test_fast_decay_is_stable():
    q, k, v, g, beta = random_inputs(1, 300, 2, 8, 8, seed=5, slow=False)
    g[:, 100:110] = -50.0  # near-total forgetting must not overflow inside a chunk
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta)
    o, s = gated_delta_rule_chunked(q, k, v, g, beta)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_associative_recall_16k():
    """Orthonormal keys, beta = 1, no decay: reading a key returns the last value written to it, after
    16K tokens of writes (every key rewritten many times)."""
    dk = dv = 32
    T = 16384
    keys = torch.linalg.qr(torch.randn(dk, dk, generator=torch.Generator().manual_seed(0)))[0].T  # rows orthonormal
    gen = torch.Generator().manual_seed(1)
    which = torch.randint(0, dk, (T,), generator=gen)
    k = keys[which][None, :, None, :]
    v = torch.randn(1, T, 1, dv, generator=gen)
    g = torch.zeros(1, T, 1)
    beta = torch.ones(1, T, 1)
    q = k.clone()  # query each key as it is written: returns the value just stored
    o, S = gated_delta_rule_chunked(q, k, v, g, beta)
    torch.testing.assert_close(o, v, rtol=1e-4, atol=1e-4)
    last = {int(w): t for t, w in enumerate(which.tolist())}
    for key_id, t in list(last.items()):
        torch.testing.assert_close(S[0, 0].T @ keys[key_id], v[0, t, 0], rtol=1e-4, atol=1e-4)


def _kernels_or_skip():
    from qwen35.ops import cpu_kernels

    if cpu_kernels.build() is None:
        pytest.skip("CPU kernels could not be compiled here")
    return cpu_kernels


@pytest.mark.parametrize("T", [1, 15, 16, 17, 95, 130])
@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_prefill_kernel_equals_naive(T, chunk, with_state):
    """csrc/gdn_prefill.cpp against the token-by-token equations: grouped heads (value head h reads q/k head
    h // 2), lengths across chunk edges, a carried state, slow decay (long memory)."""
    _kernels_or_skip()
    B, Hk, H, dk, dv = 2, 2, 4, 16, 32
    q, k, v, g, beta = random_inputs(B, T, H, dk, dv, seed=T + chunk)
    q, k = q[:, :, :Hk], k[:, :, :Hk]
    S0 = torch.randn(B, H, dk, dv) if with_state else None
    S0_before = None if S0 is None else S0.clone()
    o, s = gated_delta_rule_prefill(q, k, v, g, beta, S0, chunk_size=chunk)
    if S0 is not None:
        assert torch.equal(S0, S0_before)  # the caller's state is not modified in place
    o_ref, s_ref = gated_delta_rule_naive(q.repeat_interleave(2, 2), k.repeat_interleave(2, 2), v, g, beta, S0)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_prefill_kernel_equals_chunked_twin():
    """The kernel against its torch twin on the 0.8B's head shape (dk = dv = 128), bf16 values, strided v (a
    slice of the conv output, as the layer passes it), fast decay with near-total forgetting, written into `out`."""
    ck = _kernels_or_skip()
    T, H, dk, dv = 300, 4, 128, 128
    q, k, _, g, beta = random_inputs(1, T, H, dk, dv, seed=7, slow=False)
    g[:, 100:110] = -50.0
    wide = torch.randn(1, T, H, 2 * dv, generator=torch.Generator().manual_seed(8)).bfloat16()
    v = wide[..., dv:]
    out = torch.full((1, T, H, dv), float("nan"))
    o, s = gated_delta_rule_prefill(q, k, v, g, beta, out=out)
    assert o is out
    previous = ck.set_enabled(False)
    try:
        o_twin, s_twin = gated_delta_rule_prefill(q, k, v, g, beta)
    finally:
        ck.set_enabled(previous)
    torch.testing.assert_close(o, o_twin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_twin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_normalises_raw_q_and_k(dtype):
    """With l2norm_eps the kernel normalises raw q/k rows itself (read in the model dtype from strided slices of
    the conv output, as the layer passes them): equal to normalising first (`l2_normalize`) and the twin."""
    ck = _kernels_or_skip()
    gen = torch.Generator().manual_seed(11)
    T, Hk, H, dk, dv = 70, 2, 4, 32, 16
    conv = (torch.randn(1, T, 2 * Hk * dk + H * dv, generator=gen) * 3).to(dtype)  # q | k | v per row
    q, k, v = conv.split([Hk * dk, Hk * dk, H * dv], dim=-1)
    q, k, v = q.view(1, T, Hk, dk), k.view(1, T, Hk, dk), v.view(1, T, H, dv)
    g, beta = -torch.rand(1, T, H, generator=gen) * 0.1, torch.rand(1, T, H, generator=gen)
    o, s = gated_delta_rule_prefill(q, k, v, g, beta, chunk_size=32, l2norm_eps=1e-6, q_scale=dk**-0.5)
    qn, kn = l2_normalize(q, 1e-6, dk**-0.5), l2_normalize(k, 1e-6)
    o_ref, s_ref = gated_delta_rule_naive(qn.repeat_interleave(2, 2), kn.repeat_interleave(2, 2), v.float(), g, beta)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    previous = ck.set_enabled(False)
    try:
        o_twin, _ = gated_delta_rule_prefill(q, k, v, g, beta, chunk_size=32, l2norm_eps=1e-6, q_scale=dk**-0.5)
    finally:
        ck.set_enabled(previous)
    torch.testing.assert_close(o, o_twin, rtol=1e-5, atol=1e-5)


def test_prefill_kernel_rejects_bad_shapes():
    ck = _kernels_or_skip().build()
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="state must be contiguous fp32"):
        ck.gdn_chunked_prefill(q, q, torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2), torch.zeros(1, 4, 2),
                               torch.zeros(1, 2, 16, 8), torch.zeros(1, 4, 2, 16), 16, -1.0, 1.0)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ck.gdn_chunked_prefill(q, q, torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2), torch.zeros(1, 4, 2),
                               torch.zeros(1, 2, 16, 16), torch.zeros(1, 4, 2, 16), 8, -1.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 3, 100])
@pytest.mark.parametrize("with_window", [False, True])
def test_causal_conv_kernel_equals_torch(dtype, T, with_window):
    """The fused prefill conv + SiLU kernel (csrc/conv.cpp) against the torch path, channels across the
    16-wide vectors, windows shorter than the chunk and longer."""
    from qwen35.ops import cpu_kernels

    if cpu_kernels.build() is None:
        pytest.skip("CPU kernels could not be compiled here")
    gen = torch.Generator().manual_seed(T)
    C, K = 40, 4
    x = torch.randn(1, T, C + 8, generator=gen).to(dtype)[..., 4:C + 4]  # strided rows, as a projection's slice
    w = torch.randn(C, K, generator=gen).to(dtype)
    win = torch.randn(1, C, K - 1, generator=gen).to(dtype) if with_window else None
    y, new_win = causal_conv1d(x, w, win)
    previous = cpu_kernels.set_enabled(False)
    try:
        y_ref, win_ref = causal_conv1d(x, w, win)
    finally:
        cpu_kernels.set_enabled(previous)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    assert torch.equal(new_win, win_ref)


@pytest.mark.parametrize("T", [1, 2, 3, 10])
def test_causal_conv_forms_agree(T):
    gen = torch.Generator().manual_seed(T)
    C, K = 6, 4
    x, w, win = torch.randn(T, C, generator=gen), torch.randn(C, K, generator=gen), torch.randn(C, K - 1, generator=gen)
    y_ref, win_ref = causal_conv1d_reference(x, w, win)
    y, new_win = causal_conv1d(x[None], w, win[None])
    torch.testing.assert_close(y[0], y_ref)
    torch.testing.assert_close(new_win[0], win_ref)
    window = win[None].clone()
    steps = torch.stack([causal_conv1d_step(x[t][None], w, window)[0] for t in range(T)])
    torch.testing.assert_close(steps, y_ref)
    torch.testing.assert_close(window[0], win_ref)
    # no window = zeros before the sequence
    y0, _ = causal_conv1d(x[None], w)
    torch.testing.assert_close(y0[0], causal_conv1d_reference(x, w)[0])
