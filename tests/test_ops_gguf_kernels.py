"""csrc/gguf.cpp, the kernels on GGUF (llama.cpp) blocks kept as they are (Q8_0, Q4_K, Q5_K, Q6_K), against the
obviously-correct twins: gguf.quants.dequantize (the `gguf` package's own widening, the ground truth of the block
layouts) and fp64 products of its fp32 weights.

The blocks are random bytes with sane fp16 scales (negative ones too where the format allows), so that every
nibble, high bit, 6-bit scale and min takes all its values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen35.ops import cpu_kernels

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

_module = cpu_kernels.build()
kernels = _module if _module is not None and hasattr(_module, "gemv_gguf") else None
pytestmark = pytest.mark.skipif(kernels is None, reason="the GGUF CPU kernels could not be compiled here")

Q8_0, Q4_K, Q5_K, Q6_K = 8, 12, 13, 14
# type id -> (name, weights per block, bytes per block, where the fp16 scales sit, negative d allowed)
BLOCKS = {
    Q8_0: ("Q8_0", 32, 34, (0,), True),
    Q4_K: ("Q4_K", 256, 144, (0, 2), False),
    Q5_K: ("Q5_K", 256, 176, (0, 2), False),
    Q6_K: ("Q6_K", 256, 210, (208,), True),
}
TYPES = list(BLOCKS)
KS = {Q8_0: (32, 96, 1024), Q4_K: (256, 768, 2048), Q5_K: (256, 768, 2048), Q6_K: (256, 768, 2048)}


@pytest.fixture(autouse=True, scope="module")
def threads_and_denormals():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    _module.flush_denormals_all_threads()
    torch.set_flush_denormal(True)  # the engine runs so; no value here is ever subnormal
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(previous)


def random_blocks(qtype: int, n: int, k: int, seed: int) -> torch.Tensor:
    """uint8 [n, row_bytes]: random bytes, the fp16 d (and dmin) fields set to values in 1e-3..3e-2."""
    _, elems, size, offsets, signed = BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    nb = k // elems
    q = rng.integers(0, 256, size=(n, nb, size), dtype=np.uint8)
    for off in offsets:
        d = rng.uniform(1e-3, 3e-2, size=(n, nb))
        if signed:
            d = np.where(rng.random((n, nb)) < 0.3, -d, d)
        q[:, :, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    return torch.from_numpy(q.reshape(n, nb * size))


def reference(q: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """fp32 [n, k]: the weights as gguf.quants.dequantize widens them."""
    w = dequantize(q.numpy(), GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(q.shape[0], k)


def test_the_type_ids_are_ggmls():
    for qtype, (name, elems, size, _, _) in BLOCKS.items():
        t = GGMLQuantizationType(qtype)
        assert t.name == name and gguf.GGML_QUANT_SIZES[t] == (elems, size)


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_dequant_is_bit_exact(qtype):
    """fp32 bit for bit equal to gguf.quants.dequantize (every product is exact in fp32, Q4_K / Q5_K's one
    subtraction rounds as numpy's); the bf16 variant is that value rounded to nearest even; row ranges."""
    for k in KS[qtype]:
        n = 37
        q = random_blocks(qtype, n, k, seed=qtype * 100 + k)
        want = reference(q, qtype, k)
        got = kernels.gguf_dequant(q, qtype, k, 0, n, False)
        assert got.dtype == torch.float32 and got.shape == (n, k)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        part = kernels.gguf_dequant(q, qtype, k, 5, 30, True)
        assert part.dtype == torch.bfloat16 and part.shape == (25, k)
        assert torch.equal(part.view(torch.int16), want[5:30].bfloat16().view(torch.int16))
        assert kernels.gguf_dequant(q, qtype, k, 9, 9, False).shape == (0, k)


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_dequant_rows_is_an_embedding_lookup(qtype):
    k = KS[qtype][1]
    q = random_blocks(qtype, 50, k, seed=qtype)
    want = reference(q, qtype, k)
    ids = torch.tensor([3, 0, 49, 3, 17, 17, 8])
    got = kernels.gguf_dequant_rows(q, qtype, k, ids, False)
    assert torch.equal(got.view(torch.int32), want[ids].view(torch.int32))
    got16 = kernels.gguf_dequant_rows(q, qtype, k, ids, True)
    assert torch.equal(got16.view(torch.int16), want[ids].bfloat16().view(torch.int16))
    assert kernels.gguf_dequant_rows(q, qtype, k, torch.zeros(0, dtype=torch.long), True).shape == (0, k)


def check_product(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got (bf16) = x @ w.T rounded once to bf16: within a half bf16 step of the fp64 product plus fp32 summation
    noise, and equal to the rounded fp64 product but for rounding ties."""
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    err = (got.double() - exact).abs()
    assert (err <= 2.0**-8 * exact.abs() + 1e-5 * scale + 1e-30).all(), float((err / (scale + 1e-30)).max())
    assert (got != exact.float().bfloat16()).float().mean() <= 0.03


GEMV_ROWS = [1, 2, 3, 8, 17, 32]
GEMV_N = [1, 7, 100, 300]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", GEMV_ROWS)
def test_gemv_gguf_equals_linear_on_the_widened_weight(qtype, rows):
    """Every K of the type (one block, several), N off any tiling (1, 7, 100, 300), input rows with a stride."""
    for i, k in enumerate(KS[qtype]):
        n = GEMV_N[(i + rows) % len(GEMV_N)]
        seed = qtype * 1000 + rows * 10 + i
        q = random_blocks(qtype, n, k, seed)
        w = reference(q, qtype, k)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(rows, k + 24, generator=gen).bfloat16()[:, 5:5 + k]  # row stride k + 24
        check_product(kernels.gemv_gguf(x, q, qtype), x, w)


@pytest.mark.parametrize("qtype", TYPES)
def test_gemv_gguf_is_exact_on_one_hot_inputs(qtype):
    """One-hot inputs pick single weights: y is the widened weight rounded to bf16, at every position of every
    block (decode order, scales), 8 inputs at a time, and 32 (more than 8 take the GEMM on widened tiles)."""
    n = 19
    for k, rows in ((KS[qtype][1], 8), (KS[qtype][2], 32)):
        q = random_blocks(qtype, n, k, seed=qtype + k)
        w = reference(q, qtype, k)
        eye = torch.eye(k).bfloat16()
        for k0 in range(0, k, rows):
            y = kernels.gemv_gguf(eye[k0:k0 + rows], q, qtype)
            assert torch.equal(y, w[:, k0:k0 + rows].T.bfloat16())


def test_gemv_gguf_zero_rows_and_zero_inputs():
    q = random_blocks(Q4_K, 30, 512, seed=1)
    assert kernels.gemv_gguf(torch.zeros(0, 512).bfloat16(), q, Q4_K).shape == (0, 30)
    assert (kernels.gemv_gguf(torch.zeros(3, 512).bfloat16(), q, Q4_K) == 0).all()


@pytest.mark.parametrize("rows,qtype,n,k", [(33, Q4_K, 9000, 1024), (100, Q6_K, 2300, 2048), (512, Q8_0, 4500, 1024),
                                            (512, Q5_K, 300, 512), (1, Q4_K, 70, 256)])
def test_linear_gguf_prefill_equals_linear_on_the_widened_weight(rows, qtype, n, k):
    """Several tiles (the first three shapes are 37 / 19 / 18 MB of fp32 in tiles of 16 MB) and one; F.linear on
    the fp32 weight up to the GEMM's summation order, rounded once (on the bf16-rounded weight where the build
    multiplies in bf16: AVX512-BF16 / AMX)."""
    q = random_blocks(qtype, n, k, seed=rows + k)
    w = reference(q, qtype, k)
    if kernels.gguf_prefill_bf16():
        w = w.bfloat16().float()
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
    got = kernels.linear_gguf_prefill(x, q, qtype)
    check_product(got, x, w)
    ref = F.linear(x.float(), w).bfloat16()
    assert (got != ref).float().mean() < 0.02


def moe_twin(x, gu_w, dn_w, ids, weights) -> torch.Tensor:
    """The ExpertDispatch loop with moe_experts_bf16's roundings (see csrc/moe.cpp) over the widened experts: per
    token its experts in ascending id, dots in fp64."""
    def rb(v):
        return v.to(torch.bfloat16).double()

    i = gu_w.shape[1] // 2
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    for m in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in sorted(range(ids.shape[1]), key=lambda j: int(ids[m, j])):
            e = int(ids[m, j])
            g = rb(gu_w[e, :i] @ x[m].double())
            u = rb(gu_w[e, i:] @ x[m].double())
            a = rb(rb(F.silu(g)) * u)
            y = rb(rb(dn_w[e] @ a) * weights[m, j].double())
            acc = rb(acc + y)
        out[m] = acc.to(torch.bfloat16)
    return out


def moe_experts(e: int, h: int, i: int, gu_type: int, dn_type: int, seed: int):
    gu = torch.stack([random_blocks(gu_type, 2 * i, h, seed + j) for j in range(e)])
    dn = torch.stack([random_blocks(dn_type, h, i, seed + 100 + j) for j in range(e)])
    gu_w = torch.stack([reference(t, gu_type, h) for t in gu]).double()
    dn_w = torch.stack([reference(t, dn_type, i) for t in dn]).double()
    return gu, dn, gu_w, dn_w


@pytest.mark.parametrize("tokens,topk,i,gu_type,dn_type", [(1, 4, 256, Q4_K, Q6_K), (3, 2, 512, Q5_K, Q8_0),
                                                           (8, 3, 256, Q6_K, Q4_K), (5, 2, 512, Q8_0, Q5_K)])
def test_moe_experts_gguf_equals_the_expert_loop(tokens, topk, i, gu_type, dn_type):
    e, h = 8, 256
    gen = torch.Generator().manual_seed(tokens * 10 + topk)
    gu, dn, gu_w, dn_w = moe_experts(e, h, i, gu_type, dn_type, seed=tokens + i)
    x = (torch.randn(tokens, h, generator=gen) * 2).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=gen)[:topk] for _ in range(tokens)])  # not in ascending order
    weights = torch.softmax(torch.randn(tokens, topk, generator=gen), -1).bfloat16()
    got = kernels.moe_experts_gguf(x, gu, gu_type, dn, dn_type, i, ids, weights)
    want = moe_twin(x, gu_w, dn_w, ids, weights)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, h)
    assert (got != want).float().mean() < 0.02  # rounding ties of the fp32 vs fp64 dots only
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.float().abs().max()))


def test_bad_inputs_raise_clear_errors():
    q = random_blocks(Q4_K, 40, 512, seed=3)
    x = torch.randn(2, 512).bfloat16()
    with pytest.raises(RuntimeError, match="gemv_gguf: unsupported GGUF type id 2"):
        kernels.gemv_gguf(x, q, 2)
    with pytest.raises(RuntimeError, match="unsupported GGUF type id 99"):
        kernels.gguf_dequant(q, 99, 512, 0, 40, False)
    with pytest.raises(RuntimeError, match="gemv_gguf: x must be bf16"):
        kernels.gemv_gguf(x.float(), q, Q4_K)
    with pytest.raises(RuntimeError, match="must be uint8"):
        kernels.gemv_gguf(x, q.view(torch.int8), Q4_K)
    with pytest.raises(RuntimeError, match="K=500 is not a multiple of the Q4_K block"):
        kernels.gemv_gguf(torch.randn(2, 500).bfloat16(), q, Q4_K)
    with pytest.raises(RuntimeError, match="K=100 is not a multiple of the Q8_0 block"):
        kernels.gguf_dequant(random_blocks(Q8_0, 4, 64, 1), Q8_0, 100, 0, 4, False)
    with pytest.raises(RuntimeError, match="rows of 288 bytes but K=512 in Q6_K needs 420"):
        kernels.gemv_gguf(x, q, Q6_K)
    with pytest.raises(RuntimeError, match="rows of 288 bytes but K=256 in Q4_K needs 144"):
        kernels.linear_gguf_prefill(torch.randn(40, 256).bfloat16(), q, Q4_K)
    wide = torch.cat([q, q[:, :4]], 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.gemv_gguf(x, wide[:, :288], Q4_K)
    with pytest.raises(RuntimeError, match="at most 32 rows"):
        kernels.gemv_gguf(torch.randn(33, 512).bfloat16(), q, Q4_K)
    with pytest.raises(RuntimeError, match="not within"):
        kernels.gguf_dequant(q, Q4_K, 512, 10, 41, False)
    with pytest.raises(RuntimeError, match=r"ids\[1\] = 40 out of range"):
        kernels.gguf_dequant_rows(q, Q4_K, 512, torch.tensor([0, 40]), False)
    with pytest.raises(RuntimeError, match="int64"):
        kernels.gguf_dequant_rows(q, Q4_K, 512, torch.tensor([0, 1], dtype=torch.int32), False)

    gu, dn, _, _ = moe_experts(3, 256, 256, Q4_K, Q6_K, seed=5)
    xm, w = torch.randn(1, 256).bfloat16(), torch.ones(1, 2).bfloat16()
    with pytest.raises(RuntimeError, match="expert id 3 out of range"):
        kernels.moe_experts_gguf(xm, gu, Q4_K, dn, Q6_K, 256, torch.tensor([[0, 3]]), w)
    with pytest.raises(RuntimeError, match="dn_q has rows of 210 bytes but K=256 in Q4_K needs 144"):
        kernels.moe_experts_gguf(xm, gu, Q4_K, dn, Q4_K, 256, torch.tensor([[0, 1]]), w)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        kernels.moe_experts_gguf(xm, gu, Q4_K, gu, Q4_K, 256, torch.tensor([[0, 1]]), w)  # gate|up as down
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.moe_experts_gguf(xm.float(), gu, Q4_K, dn, Q6_K, 256, torch.tensor([[0, 1]]), w)


def test_prefill_works_inside_and_outside_inference_mode_in_turn():
    """The tile buffers kept between calls must not carry inference mode from one call into the next (the model
    runs under torch.inference_mode, tests and users call outside it)."""
    q = random_blocks(Q4_K, 300, 512, seed=5)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.inference_mode():
        a = kernels.linear_gguf_prefill(x, q, Q4_K)
    b = kernels.linear_gguf_prefill(x, q, Q4_K)
    with torch.inference_mode():
        c = kernels.gemv_gguf(x[:20], q, Q4_K)
    d = kernels.gemv_gguf(x[:20], q, Q4_K)
    assert torch.equal(a, b) and torch.equal(c, d)


@pytest.mark.parametrize("tokens,topk,i,gu_type,dn_type", [(9, 2, 256, Q4_K, Q6_K), (37, 3, 512, Q5_K, Q8_0),
                                                           (100, 4, 256, Q6_K, Q4_K), (61, 2, 96, Q8_0, Q8_0)])
def test_moe_experts_gguf_grouped_equals_the_expert_loop(tokens, topk, i, gu_type, dn_type):
    """The prompt kernel: tokens grouped by expert (experts get 0 to dozens of tokens, so every group size of the
    kernel's 4 x 4 blocks and an expert nobody chose occur)."""
    e, h = 9, 256 if gu_type != Q8_0 else 160
    gen = torch.Generator().manual_seed(tokens * 10 + topk)
    gu, dn, gu_w, dn_w = moe_experts(e, h, i, gu_type, dn_type, seed=tokens + i)
    x = (torch.randn(tokens, h, generator=gen) * 2).bfloat16()
    # expert 8 is never chosen; the others unevenly (expert 0 by most tokens)
    ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(7, generator=gen)])[:topk]
                       if t % 3 else 1 + torch.randperm(7, generator=gen)[:topk] for t in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, topk, generator=gen), -1).bfloat16()
    got = kernels.moe_experts_gguf_grouped(x, gu, gu_type, dn, dn_type, i, ids, weights)
    want = moe_twin(x, gu_w, dn_w, ids, weights)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, h)
    assert (got != want).float().mean() < 0.02  # rounding ties of the fp32 vs fp64 dots only
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.float().abs().max()))
    per_token = torch.cat([kernels.moe_experts_gguf(x[t:t + 8], gu, gu_type, dn, dn_type, i, ids[t:t + 8],
                                                    weights[t:t + 8]) for t in range(0, tokens, 8)])
    assert (got != per_token).float().mean() < 0.02  # the decode kernel: the same roundings, other sum orders


def test_moe_experts_gguf_grouped_bad_inputs_and_empty():
    gu, dn, _, _ = moe_experts(3, 256, 256, Q4_K, Q6_K, seed=5)
    x, w = torch.randn(12, 256).bfloat16(), torch.ones(12, 2).bfloat16()
    ids = torch.tensor([[0, 1]] * 12)
    with pytest.raises(RuntimeError, match="moe_experts_gguf_grouped: expert id 3 out of range"):
        kernels.moe_experts_gguf_grouped(x, gu, Q4_K, dn, Q6_K, 256, ids + 2, w)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        kernels.moe_experts_gguf_grouped(x, gu, Q4_K, gu, Q4_K, 256, ids, w)
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.moe_experts_gguf_grouped(x.float(), gu, Q4_K, dn, Q6_K, 256, ids, w)
    with pytest.raises(RuntimeError, match="ids has 11 rows but x has 12"):
        kernels.moe_experts_gguf_grouped(x, gu, Q4_K, dn, Q6_K, 256, ids[:11], w[:11])
    empty = kernels.moe_experts_gguf_grouped(x[:0], gu, Q4_K, dn, Q6_K, 256, ids[:0], w[:0])
    assert empty.shape == (0, 256)
