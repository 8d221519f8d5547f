"""csrc/fp8.cpp, the block-FP8 kernels (e4m3fn bytes, fp32 scale per 128x128 block, a scale row per weight row),
against their obviously-correct twins: the fp32 dequantised weight q.float() * scale and fp64 products.

Run with FTZ+DAZ on every thread, as the engine runs: the e4m3 subnormals (m * 2^-9) must survive it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen35.ops import cpu_kernels

kernels = cpu_kernels.build()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels could not be compiled here")

BLOCK = 128
NAN_BYTES = (0x7F, 0xFF)


@pytest.fixture(autouse=True, scope="module")
def flush_denormals():
    kernels.flush_denormals_all_threads()
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def e4m3_value(b: int) -> float:
    """The value of an e4m3fn byte, from its fields."""
    e, m = (b >> 3) & 15, b & 7
    mag = m * 2.0**-9 if e == 0 else (8 + m) * 2.0 ** (e - 10)
    return -mag if b & 0x80 else mag


def fp8_weight(parts: list[int], k: int, gen: torch.Generator, *, special: bool = True) -> dict:
    """Random block-FP8 weights as a checkpoint holds them: per part (a matrix of fused rows) a scale per 128x128
    block (amax / 448), q = round(w / scale) in e4m3; the parts' tables concatenated, srow offset. With special,
    also exact zeros, subnormal bytes and a sprinkling of every byte value (NaN aside)."""
    kb = math.ceil(k / BLOCK)
    qs, scales, srows, offset = [], [], [], 0
    for rows in parts:
        rb = math.ceil(rows / BLOCK)
        w = torch.zeros(rb * BLOCK, kb * BLOCK)
        w[:rows, :k] = torch.randn(rows, k, generator=gen) * torch.rand(1, k, generator=gen) * 0.1
        amax = w.view(rb, BLOCK, kb, BLOCK).abs().amax(dim=(1, 3))
        scale = (amax / 448).clamp(min=1e-8) * (1 + torch.rand(rb, kb, generator=gen))  # not only powers of two
        full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        q = (w / full).clamp(-448, 448)[:rows, :k].to(torch.float8_e4m3fn).view(torch.uint8).clone()
        qs.append(q)
        scales.append(scale)
        srows.append(torch.arange(rows, dtype=torch.int32) // BLOCK + offset)
        offset += rb
    q = torch.cat(qs)
    if special:
        n = q.shape[0]
        spots = torch.randint(0, n * k, (max(n * k // 20, 1),), generator=gen)
        q.view(-1)[spots] = torch.randint(0, 256, spots.shape, generator=gen, dtype=torch.uint8)
        spots = torch.randint(0, n * k, (max(n * k // 20, 1),), generator=gen)
        q.view(-1)[spots] = torch.randint(0, 8, spots.shape, generator=gen, dtype=torch.uint8) | (
            torch.randint(0, 2, spots.shape, generator=gen, dtype=torch.uint8) << 7)  # zeros and subnormals
        for b in NAN_BYTES:
            q[q == b] = b - 1
    return {"q": q, "scale": torch.cat(scales), "srow": torch.cat(srows)}


def dequant_fp32(t: dict) -> torch.Tensor:
    """W[n, k] = e4m3(q[n, k]) * scale[srow[n], k // 128], in fp32."""
    k = t["q"].shape[-1]
    s = t["scale"][t["srow"].long()].repeat_interleave(BLOCK, dim=-1)[:, :k]
    return t["q"].view(torch.float8_e4m3fn).float() * s


def test_torch_e4m3_conversion_is_exact_under_ftz():
    """The reference's own q.float() keeps every byte's value (subnormals included) with FTZ+DAZ on."""
    b = torch.tensor([v for v in range(256) if v not in NAN_BYTES], dtype=torch.uint8)
    want = torch.tensor([e4m3_value(int(v)) for v in b], dtype=torch.float64)
    assert torch.equal(b.view(torch.float8_e4m3fn).double(), want)


@pytest.mark.parametrize("k", [200, 1000])
def test_gemv_fp8_is_exact_on_every_byte_in_every_lane(k):
    """One-hot inputs pick single weights: y equals the fp32 dequantised weight bit for bit, for all 254 byte
    values at every position of the 64-byte chunks (decode, lane order, scales, tails)."""
    n = 254
    nk = torch.arange(n)[:, None] * 7 + torch.arange(k)[None, :] * 3
    good = torch.tensor([v for v in range(256) if v not in NAN_BYTES], dtype=torch.uint8)
    q = good[nk % len(good)]
    t = {"q": q, "scale": torch.rand(2, math.ceil(k / BLOCK), generator=torch.Generator().manual_seed(k)) + 0.01,
         "srow": (torch.arange(n, dtype=torch.int32) // BLOCK)}
    w32 = dequant_fp32(t)
    eye = torch.eye(k).bfloat16()
    for k0 in range(0, k, 32):
        y = kernels.gemv_fp8(eye[k0:k0 + 32], t["q"], t["scale"], t["srow"])
        assert torch.equal(y, w32[:, k0:k0 + 32].T)


GEMV_SHAPES = [([37], 80), ([300], 200), ([37, 91], 1000), ([130], 128), ([5], 64)]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 32])
@pytest.mark.parametrize("parts,k", GEMV_SHAPES)
def test_gemv_fp8_equals_the_dequantized_matmul(rows, parts, k):
    """K and N off the 128 / 64 / 32 steps, a fused matrix (parts of 37 and 91 rows), strided input rows."""
    gen = torch.Generator().manual_seed(rows * 1000 + k + len(parts))
    t = fp8_weight(parts, k, gen)
    w = dequant_fp32(t).double()
    x = torch.randn(rows, k + 40, generator=gen).bfloat16()[:, 7:7 + k]  # row stride k + 40
    expected = x.double() @ w.T
    bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30
    got = kernels.gemv_fp8(x, t["q"], t["scale"], t["srow"])
    assert got.dtype == torch.float32 and got.shape == (rows, sum(parts))
    assert ((got.double() - expected).abs() <= bound).all()
    rounded = kernels.gemv_fp8(x, t["q"], t["scale"], t["srow"], out_bf16=True)
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, got.bfloat16())  # the same sums, rounded as Tensor.to rounds
    as_fp8 = kernels.gemv_fp8(x, t["q"].view(torch.float8_e4m3fn), t["scale"], t["srow"])
    assert torch.equal(as_fp8, got)  # the bytes may come as their float8 dtype too


def test_gemv_fp8_zero_rows_and_zero_inputs():
    t = fp8_weight([70], 150, torch.Generator().manual_seed(5))
    assert kernels.gemv_fp8(torch.zeros(0, 150).bfloat16(), t["q"], t["scale"], t["srow"]).shape == (0, 70)
    assert (kernels.gemv_fp8(torch.zeros(3, 150).bfloat16(), t["q"], t["scale"], t["srow"]) == 0).all()


@pytest.mark.parametrize("k", [16, 200, 1000])
def test_fp8_dequant_bf16_equals_torch_rounding_on_every_byte(k):
    """Bit-equal to (q.float() * scale).to(bf16) over all byte values (NaN aside), scales with full and with short
    mantissas (rounding ties), whole matrices and row ranges."""
    gen = torch.Generator().manual_seed(k)
    n = 300
    good = torch.tensor([v for v in range(256) if v not in NAN_BYTES], dtype=torch.uint8)
    q = good[torch.randint(0, len(good), (n, k), generator=gen)]
    q[0, : min(k, len(good))] = good[: min(k, len(good))]
    scale = torch.rand(4, math.ceil(k / BLOCK), generator=gen) * 1e-2 + 1e-4
    # short mantissas, so that many products fall exactly halfway between two bf16 (ties to even)
    scale[:2] = (1 + torch.randint(0, 256, scale[:2].shape, generator=gen) / 256) * 2.0**-7
    srow = torch.randint(0, 4, (n,), generator=gen, dtype=torch.int32)
    t = {"q": q, "scale": scale, "srow": srow}
    want = dequant_fp32(t).bfloat16()
    got = kernels.fp8_dequant_bf16(q, scale, srow, 0, n)
    assert got.dtype == torch.bfloat16 and got.shape == (n, k)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    part = kernels.fp8_dequant_bf16(q, scale, srow, 37, 128)
    assert torch.equal(part.view(torch.int16), want[37:128].view(torch.int16))
    assert kernels.fp8_dequant_bf16(q, scale, srow, 5, 5).shape == (0, k)


@pytest.mark.parametrize("rows,parts,k", [(40, [1100], 1000), (33, [300], 200), (64, [37, 91], 256), (1, [70], 80)])
def test_linear_fp8_prefill_equals_linear_on_the_widened_weight(rows, parts, k):
    """Several tiles (1100 x 1000 is 2.2 MB of bf16) and one; the result is F.linear on the widened weight up to
    the GEMM's summation order."""
    gen = torch.Generator().manual_seed(rows + k)
    t = fp8_weight(parts, k, gen)
    n = sum(parts)
    x = torch.randn(rows, k, generator=gen).bfloat16()
    w = kernels.fp8_dequant_bf16(t["q"], t["scale"], t["srow"], 0, n)
    got = kernels.linear_fp8_prefill(x, t["q"], t["scale"], t["srow"])
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    exact = x.double() @ w.double().T
    bound = 2**-8 * exact.abs() + 1e-4 * (x.double().abs() @ w.double().abs().T)
    assert ((got.double() - exact).abs() <= bound).all()
    ref = F.linear(x, w)
    assert (got != ref).float().mean() < 0.02


def moe_weights(e: int, h: int, i: int, gen: torch.Generator) -> tuple[dict, dict]:
    """Experts' gate|up [E, 2I, H] (two fused parts of I rows: a shared srow) and down [E, H, I]."""
    gus, dns = [fp8_weight([i, i], h, gen) for _ in range(e)], [fp8_weight([h], i, gen) for _ in range(e)]
    stack = lambda ts: {"q": torch.stack([t["q"] for t in ts]), "scale": torch.stack([t["scale"] for t in ts]),  # noqa: E731
                        "srow": ts[0]["srow"], "w": torch.stack([dequant_fp32(t) for t in ts]).double()}
    return stack(gus), stack(dns)


def moe_twin(x, gu, dn, ids, weights) -> torch.Tensor:
    """moe_experts_bf16's roundings (see csrc/moe.cpp) over the fp32 dequantised experts, dots in fp64."""
    def rb(v):
        return v.to(torch.bfloat16).double()

    i = gu["w"].shape[1] // 2
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    for m in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in sorted(range(ids.shape[1]), key=lambda j: int(ids[m, j])):
            e = int(ids[m, j])
            g = rb(gu["w"][e, :i] @ x[m].double())
            u = rb(gu["w"][e, i:] @ x[m].double())
            a = rb(rb(F.silu(g)) * u)
            y = rb(rb(dn["w"][e] @ a) * weights[m, j].double())
            acc = rb(acc + y)
        out[m] = acc.to(torch.bfloat16)
    return out


@pytest.mark.parametrize("tokens,topk,h,i", [(1, 4, 200, 150), (3, 2, 256, 80), (5, 3, 130, 300)])
def test_moe_experts_fp8_equals_the_expert_loop(tokens, topk, h, i):
    gen = torch.Generator().manual_seed(tokens * 10 + topk)
    e = 6
    gu, dn = moe_weights(e, h, i, gen)
    x = (torch.randn(tokens, h, generator=gen) * 2).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=gen)[:topk] for _ in range(tokens)])  # not in ascending order
    weights = torch.softmax(torch.randn(tokens, topk, generator=gen), -1).bfloat16()
    got = kernels.moe_experts_fp8(x, gu["q"], gu["scale"], gu["srow"], dn["q"], dn["scale"], dn["srow"], ids,
                                  weights)
    want = moe_twin(x, gu, dn, ids, weights)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, h)
    assert (got != want).float().mean() < 0.02  # rounding ties of the fp32 vs fp64 dots only
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.float().abs().max()))


def test_bad_inputs_raise_clear_errors():
    t = fp8_weight([40], 100, torch.Generator().manual_seed(9), special=False)
    q, scale, srow = t["q"], t["scale"], t["srow"]
    x = torch.randn(2, 100).bfloat16()
    with pytest.raises(RuntimeError, match="uint8"):
        kernels.gemv_fp8(x, q.view(torch.int8), scale, srow)
    with pytest.raises(RuntimeError, match="fp32"):
        kernels.gemv_fp8(x, q, scale.double(), srow)
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.gemv_fp8(x.float(), q, scale, srow)
    with pytest.raises(RuntimeError, match="int32"):
        kernels.gemv_fp8(x, q, scale, srow.long())
    with pytest.raises(RuntimeError, match="K="):
        kernels.gemv_fp8(torch.randn(2, 101).bfloat16(), q, scale, srow)
    with pytest.raises(RuntimeError, match="at most"):
        kernels.gemv_fp8(torch.randn(33, 100).bfloat16(), q, scale, srow)
    with pytest.raises(RuntimeError, match="columns"):
        kernels.gemv_fp8(x, q, torch.ones(1, 2), srow)
    bad = srow.clone()
    bad[7] = 1
    with pytest.raises(RuntimeError, match=r"srow\[7\] = 1 is out of range"):
        kernels.gemv_fp8(x, q, scale, bad)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.fp8_dequant_bf16(q, scale, bad, 0, 40)
    with pytest.raises(RuntimeError, match="not within"):
        kernels.fp8_dequant_bf16(q, scale, srow, 10, 41)
    with pytest.raises(RuntimeError, match="K="):
        kernels.linear_fp8_prefill(torch.randn(40, 99).bfloat16(), q, scale, srow)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.linear_fp8_prefill(torch.randn(40, 100).bfloat16(), q, scale, bad)

    gu, dn = moe_weights(3, 100, 40, torch.Generator().manual_seed(10))
    args = (gu["q"], gu["scale"], gu["srow"], dn["q"], dn["scale"], dn["srow"])
    xm, w = torch.randn(1, 100).bfloat16(), torch.ones(1, 2).bfloat16()
    with pytest.raises(RuntimeError, match="expert id 3 out of range"):
        kernels.moe_experts_fp8(xm, *args, torch.tensor([[0, 3]]), w)
    with pytest.raises(RuntimeError, match="gu_srow"):
        kernels.moe_experts_fp8(xm, gu["q"], gu["scale"], gu["srow"] + 1, *args[3:], torch.tensor([[0, 1]]), w)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        kernels.moe_experts_fp8(torch.randn(1, 99).bfloat16(), *args, torch.tensor([[0, 1]]), w)
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.moe_experts_fp8(xm.float(), *args, torch.tensor([[0, 1]]), w)
