"""The CPU GEMV kernels equal their plain twin (fp32 matmul of the same bf16 / int8 values)."""

from __future__ import annotations

import pytest
import torch

from qwen35.ops import linear as lin

kernels = lin.cpu_kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="CPU kernels could not be compiled here")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 32])
@pytest.mark.parametrize("n,k", [(1, 32), (37, 100), (256, 1024), (1000, 3584), (64, 31)])
def test_gemv_bf16_equals_fp32_matmul(rows, n, k):
    gen = torch.Generator().manual_seed(n * k + rows)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    expected = x.double() @ w.double().T
    got = kernels.gemv_bf16(x, w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * k**0.5)
    rounded = kernels.gemv_bf16(x, w, out_bf16=True)
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, got.bfloat16())  # the same sums, rounded as Tensor.to rounds


@needs_kernels
@pytest.mark.parametrize("k", [7, 100, 1030, 3584])
def test_gemv_bf16_rows_do_not_depend_on_the_batch(k):
    """Each row's result is bit for bit what that row gives alone, for any number of rows up to the GEMV's
    limit (speculative decoding's verify rows must equal decode rows), through `linear` too."""
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(300, k, generator=gen).bfloat16()
    x = torch.randn(lin.GEMV_MAX_ROWS, k, generator=gen).bfloat16()
    alone = torch.cat([kernels.gemv_bf16(x[i:i + 1], w) for i in range(len(x))])
    for m in (2, 3, 7, 8, 9, 12, 16, 17, 31, lin.GEMV_MAX_ROWS):
        assert torch.equal(kernels.gemv_bf16(x[:m], w), alone[:m]), m
        assert torch.equal(lin.linear(x[:m], w), alone[:m].bfloat16()), m


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@needs_kernels
def test_gemv_bf16_runs_on_amx_where_the_cpu_has_it():
    """On a CPU with AMX-BF16 the GEMV takes the tile kernel (csrc/gemv_amx.cpp) for every row count, so the tests
    above hold that kernel to the fp64 product and to batch invariance there."""
    flags = _cpu_flags()
    if {"amx_bf16", "amx_tile"} <= flags and kernels.isa() == "avx512_bf16":
        assert kernels.gemv_bf16_kernel() == "amx"
    else:
        assert kernels.gemv_bf16_kernel() == kernels.isa()


@needs_kernels
@pytest.mark.parametrize("rows,n,k", [(11, 300, 515), (1, 64, 32), (3, 40, 1030), (8, 17, 7), (2, 9, 300)])
def test_gemv_int8_equals_its_twin_and_the_dequantized_matmul(rows, n, k):
    """K across the 32-wide steps and the 256-wide integer blocks; a zero row; the largest int8 values."""
    from qwen35.ops.quant import int8_gemv_reference

    gen = torch.Generator().manual_seed(n * k + rows)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w[0] = 127  # worst case for the integer sums
    scale = torch.rand(n, generator=gen) / 100
    x = torch.randn(rows, k, generator=gen)
    x[-1] = 0.0
    got = kernels.gemv_int8(x, w, scale).double()
    dequantized = x.double() @ (w.double() * scale.double()[:, None]).T
    if kernels.int8_uses_int16_activations():
        torch.testing.assert_close(got, int8_gemv_reference(x, w, scale).double(), rtol=1e-5, atol=1e-5)
        # int16 activations: each element off by at most max|x| / 65534
        bound = x.abs().amax(-1, keepdim=True).double() / 65534 * (w.double().abs() * scale.double()[:, None]).sum(-1)
        assert ((got - dequantized).abs() <= bound + 1e-6).all()
    else:
        torch.testing.assert_close(got, dequantized, rtol=1e-5, atol=1e-4)
    assert (got[-1] == 0).all()


@needs_kernels
def test_gemv_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="K="):
        kernels.gemv_bf16(torch.zeros(1, 8).bfloat16(), torch.zeros(4, 9).bfloat16())
    with pytest.raises(RuntimeError, match="at most"):
        kernels.gemv_bf16(torch.zeros(33, 8).bfloat16(), torch.zeros(4, 8).bfloat16())


def test_linear_dispatch_matches_twin():
    """`linear` (kernel for few rows, F.linear otherwise) equals F.linear to bf16 rounding."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=gen).bfloat16()
    for rows in (1, 5, 40):
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        ref = x.float() @ w.float().T
        out = lin.linear(x, w)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    x32 = torch.randn(2, 64, generator=gen)
    torch.testing.assert_close(lin.linear(x32, w.float()), x32 @ w.float().T)


@pytest.mark.parametrize("m,n,k", [(9, 70, 48), (100, 1000, 1056), (300, 2050, 2000)])
def test_linear_fp32_tiles_is_linear_in_fp32(m, n, k, monkeypatch):
    """The prompt path for bf16 weights on CPUs without bf16 dots: exact products, fp32 sums, one rounding; tiles
    that do not divide the rows (a small tile size makes several)."""
    monkeypatch.setattr(lin, "FP32_TILE_BYTES", 64 * 4 * k + 4 * k)  # 65 rows a tile: 64 after the max() floor
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    exact = x.double() @ w.double().T
    for dtype in (torch.bfloat16, torch.float32):
        got = lin.linear_fp32_tiles(x, w, dtype)
        assert got.dtype == dtype and got.shape == (m, n)
        want = exact.to(dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
        else:  # equal but for rounding ties of the fp32 sums
            assert (got != want).float().mean() < 0.01
            torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-6)
    monkeypatch.setattr(lin, "_slow_bf16_gemm", True)  # linear() takes this path for prompts then
    torch.testing.assert_close(lin.linear(x[None], w)[0].float(), lin.linear_fp32_tiles(x, w, torch.bfloat16).float(),
                               rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_decode_with_and_without_kernels(tmp_path, dtype):
    """The whole model, prefill + decode over the cache: kernels (GEMV, paged attention, fused GDN step)
    vs their torch twins."""
    import json

    import qwen35
    from conftest import text_config
    from qwen35.engine.direct import DirectRun

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe_text", **text_config(moe=True)}))
    model = qwen35.load_model(tmp_path, load_format="dummy", dtype=dtype)
    ids = torch.randint(0, 131, (30,), generator=torch.Generator().manual_seed(0))

    def run(enabled: bool) -> torch.Tensor:
        previous = lin.set_cpu_kernels(enabled)
        try:
            run = DirectRun(model, num_seqs=1, max_len=64)
            outs, at = [], 0
            for n in (20, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1):
                outs.append(model.compute_logits(run.forward({0: ids[at:at + n].tolist()})[0]))
                at += n
            return torch.cat(outs).float()
        finally:
            lin.set_cpu_kernels(previous)

    fast, slow = run(True), run(False)
    scale = float(slow.abs().max())
    assert float((fast - slow).abs().max()) <= (1e-5 if dtype == "float32" else 0.03) * scale
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() >= 0.9


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_equal_their_reference(dtype):
    from qwen35.model.norm import RMSNorm, RMSNormGated

    gen = torch.Generator().manual_seed(3)
    norm, gated = RMSNorm(96), RMSNormGated(96)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=gen) * 0.1)
        gated.weight.copy_(1 + torch.randn(96, generator=gen) * 0.1)
    norm, gated = norm.to(dtype), gated.to(dtype)
    x = (torch.randn(5, 96, generator=gen) * 3).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(norm(x).float(), norm.reference(x).float(), **tol)
    o = torch.randn(5, 4, 96, generator=gen)
    z = torch.randn(5, 4, 96, generator=gen).to(dtype)
    torch.testing.assert_close(gated(o, z).float(), gated.reference(o, z).float(), **tol)


def paged_attention_reference(q, k_pool, v_pool, tables, lens, scale):
    """Gather each sequence's keys and values through its block table, softmax in fp64."""
    B, Hq, D = q.shape
    Hkv, BS = k_pool.shape[1], k_pool.shape[2]
    out = torch.empty(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        L = int(lens[b])
        keys = torch.stack([k_pool[tables[b, p // BS], :, p % BS] for p in range(L)]).double()  # [L, Hkv, D]
        vals = torch.stack([v_pool[tables[b, p // BS], :, p % BS] for p in range(L)]).double()
        keys, vals = keys.repeat_interleave(Hq // Hkv, dim=1), vals.repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].double(), keys) * scale
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vals)
    return out


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 256), (4, 4, 64), (6, 2, 80), (16, 1, 128), (5, 1, 32), (12, 2, 64)])
def test_paged_attention_equals_gathered_softmax(dtype, hq, hkv, d):
    """Lengths across partition (512) and block (16) boundaries, scattered blocks, a batch of mixed lengths."""
    gen = torch.Generator().manual_seed(hq * 1000 + d)
    lens = torch.tensor([1, 15, 17, 256, 257, 700], dtype=torch.int32)
    BS, max_blocks = 16, 45
    num_blocks = len(lens) * max_blocks
    k_pool = (torch.randn(num_blocks, hkv, BS, d, generator=gen) * 2).to(dtype)
    v_pool = torch.randn(num_blocks, hkv, BS, d, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).reshape(len(lens), max_blocks)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    scale = d**-0.5
    got = kernels.paged_attention_decode(q, k_pool, v_pool, tables, lens, scale)
    ref = paged_attention_reference(q, k_pool, v_pool, tables, lens, scale)
    assert got.dtype == torch.float32 and got.shape == (len(lens), hq, d)
    if dtype == torch.float32 or kernels.isa() != "avx512_bf16" or d % 32 or hq // hkv > 8:
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    else:
        # bf16 query and values: P.V runs on vdpbf16ps with P rounded to bf16, as torch's CPU flash attention
        # rounds it: within 2^-9 of each weight, so within 2^-9 max|v| of the output; and no worse than SDPA's
        # own bf16 result on the same keys and values
        diff, vmax = (got.double() - ref).abs(), v_pool.float().abs().max().item()
        err = diff.max().item()
        assert err <= 2**-9 * vmax and diff.mean().item() <= 2**-12 * vmax
        assert err <= 1.5 * sdpa_error(q, k_pool, v_pool, tables, lens, scale, ref) + 1e-4
    # an fp32 query against bf16 pools takes the widening path, P in fp32: the fp64 answer to 1e-5
    if dtype == torch.bfloat16:
        got32 = kernels.paged_attention_decode(q.float(), k_pool, v_pool, tables, lens, scale)
        torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_attention_over_the_cache_regions_equals_a_plain_pool(dtype):
    """The cache keeps KV blocks in regions (HybridCache: [regions, Hkv, blocks per region, BS, D] views with
    room for a GDN state between regions): the kernel reads each block where a plain [blocks, Hkv, BS, D] pool
    holds it, bit for bit; block ids it does not have are refused."""
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, BS, regions, per = 8, 2, 64, 16, 7, 5
    stride = hkv * per * BS * d + 96  # a region is a little larger than its blocks (the state is)
    buf = torch.randn(regions * stride, generator=gen).to(dtype)
    shape, strides = (regions, hkv, per, BS, d), (stride, per * BS * d, BS * d, d, 1)
    k5, v5 = buf.as_strided(shape, strides, 0), torch.randn(regions * stride, generator=gen).to(dtype)
    v5 = v5.as_strided(shape, strides, 0)
    plain_k = k5.permute(0, 2, 1, 3, 4).reshape(regions * per, hkv, BS, d)  # block r * per + j
    plain_v = v5.permute(0, 2, 1, 3, 4).reshape(regions * per, hkv, BS, d)
    lens = torch.tensor([1, 33, 100, 128], dtype=torch.int32)
    tables = torch.randperm(regions * per, generator=gen).to(torch.int32)[:32].reshape(4, 8)
    q = torch.randn(4, hq, d, generator=gen).to(dtype)
    got = kernels.paged_attention_decode(q, k5, v5, tables, lens, 0.125)
    want = kernels.paged_attention_decode(q, plain_k, plain_v, tables, lens, 0.125)
    assert torch.equal(got, want)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ref = paged_attention_reference(q, plain_k, plain_v, tables, lens, 0.125)
    torch.testing.assert_close(want.double(), ref, rtol=tol, atol=tol)
    bad = tables.clone()
    bad[1, 0] = regions * per
    with pytest.raises(RuntimeError, match="not a block of the pool"):
        kernels.paged_attention_decode(q, k5, v5, bad, lens, 0.125)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_attention_long_contexts(dtype):
    """Long contexts get longer partitions (a sixteenth of the context, 512-2048 positions) and prefetches that
    run on into the next partition: 8200 and 33000 positions (partitions of 512 and 2048, ragged last ones), slow
    decay of the scores (small scale) so that every position counts, scattered blocks."""
    gen = torch.Generator().manual_seed(11)
    hq, hkv, d, BS = 8, 2, 64, 16
    lens = torch.tensor([8200, 33000], dtype=torch.int32)
    max_blocks = (int(lens.max()) + BS - 1) // BS
    num_blocks = 2 * max_blocks
    k_pool = torch.randn(num_blocks, hkv, BS, d, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, hkv, BS, d, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).reshape(2, max_blocks)
    q = torch.randn(2, hq, d, generator=gen).to(dtype)
    scale = 0.05
    got = kernels.paged_attention_decode(q, k_pool, v_pool, tables, lens, scale).double()
    for b in range(2):
        pos = torch.arange(int(lens[b]))
        blocks, offs = tables[b, pos // BS].long(), pos % BS
        keys = k_pool[blocks, :, offs].double().repeat_interleave(hq // hkv, dim=1)  # [L, Hq, D]
        vals = v_pool[blocks, :, offs].double().repeat_interleave(hq // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[b].double(), keys) * scale, -1)
        ref = torch.einsum("hl,lhd->hd", p, vals)
        if dtype == torch.float32 or kernels.isa() != "avx512_bf16":
            torch.testing.assert_close(got[b], ref, rtol=1e-5, atol=1e-5)
        else:  # P rounded to bf16 (see above): within 2^-9 of each weight
            vmax = v_pool.float().abs().max().item()
            assert (got[b] - ref).abs().max().item() <= 2**-9 * vmax


@needs_kernels
def test_paged_attention_same_with_any_thread_count():
    """Partitions depend on the context length only, so 1 and 2 threads give bit-identical results (at 20000
    positions, where partitions are 1264 long)."""
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, BS, L = 8, 2, 64, 16, 20000
    nb = (L + BS - 1) // BS
    k_pool = torch.randn(nb, hkv, BS, d, generator=gen).bfloat16()
    v_pool = torch.randn(nb, hkv, BS, d, generator=gen).bfloat16()
    tables = torch.randperm(nb, generator=gen).to(torch.int32)[None]
    lens = torch.tensor([L], dtype=torch.int32)
    q = torch.randn(1, hq, d, generator=gen).bfloat16()
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(kernels.paged_attention_decode(q, k_pool, v_pool, tables, lens, 0.125))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


@needs_kernels
def test_paged_attention_reads_head_major_pools():
    """The cache stores its pools head-major (permuted views): the kernel follows the strides, same results."""
    gen = torch.Generator().manual_seed(7)
    hq, hkv, d, BS, nb = 8, 2, 64, 16, 40
    k_pool = torch.randn(nb, hkv, BS, d, generator=gen).bfloat16()
    v_pool = torch.randn(nb, hkv, BS, d, generator=gen).bfloat16()
    k_head = k_pool.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    v_head = v_pool.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    tables = torch.randperm(nb, generator=gen).to(torch.int32).reshape(2, 20)
    lens = torch.tensor([300, 17], dtype=torch.int32)
    q = torch.randn(2, hq, d, generator=gen).bfloat16()
    want = kernels.paged_attention_decode(q, k_pool, v_pool, tables, lens, 0.125)
    assert torch.equal(kernels.paged_attention_decode(q, k_head, v_head, tables, lens, 0.125), want)
    with pytest.raises(RuntimeError, match="same strides"):
        kernels.paged_attention_decode(q, k_head, v_pool, tables, lens, 0.125)


def sdpa_error(q, k_pool, v_pool, tables, lens, scale, ref) -> float:
    """Largest distance of torch's bf16 SDPA (one query per sequence, keys and values gathered) to `ref`."""
    Hq, Hkv, BS = q.shape[1], k_pool.shape[1], k_pool.shape[2]
    worst = 0.0
    for b in range(q.shape[0]):
        L = int(lens[b])
        keys = torch.stack([k_pool[tables[b, p // BS], :, p % BS] for p in range(L)]).transpose(0, 1)[None]
        vals = torch.stack([v_pool[tables[b, p // BS], :, p % BS] for p in range(L)]).transpose(0, 1)[None]
        out = torch.nn.functional.scaled_dot_product_attention(q[b][None, :, None], keys, vals, scale=scale,
                                                               enable_gqa=Hq != Hkv)
        worst = max(worst, (out[0, :, 0].double() - ref[b]).abs().max().item())
    return worst


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_fused_projections_equal_the_separate_layers(tmp_path, quantization):
    """load_model fuses q|k|v, gate|up and the GDN input projections into one product each: the same logits as
    running every layer on its own, weights shared (no copy), and a layer replaced afterwards is honoured."""
    import json

    import qwen35
    from conftest import text_config
    from qwen35.ops.linear import Linear, Projections

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe_text", **text_config(moe=True)}))
    model = qwen35.load_model(tmp_path, load_format="dummy", dtype=torch.float32, quantization=quantization)
    fused = [m for m in model.modules() if getattr(m, "_projections", None) is not None]
    assert len(fused) >= 2 * model.config.text.num_hidden_layers  # attention or GDN, and the shared expert
    gdn = model.model.layers[0].linear_attn
    group = gdn._projections.groups[0]
    if quantization is None:
        assert group.weight.untyped_storage().data_ptr() == gdn.in_proj_qkv.weight.untyped_storage().data_ptr()
    ids = torch.randint(0, 131, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with_fusion = model(ids)
        saved = {m: m._projections for m in fused}
        for m in fused:
            m._projections = None
        separate = model(ids)
        for m, p in saved.items():
            m._projections = p
        # replace one part: the fused product must not be used for it any more
        gdn.in_proj_z = Linear(gdn.in_proj_z.in_features, gdn.in_proj_z.out_features)
        torch.nn.init.zeros_(gdn.in_proj_z.weight)
        replaced = model(ids)
        gdn._projections = None
        replaced_separate = model(ids)
    torch.testing.assert_close(with_fusion, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replaced, replaced_separate, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(replaced, with_fusion)
    assert isinstance(Projections([gdn.in_proj_b, gdn.in_proj_a]).groups[0], lin.FusedLinears)


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_moe_experts_kernel_equals_the_expert_loop(tokens):
    """csrc/moe.cpp against `ExpertDispatch.forward` (the loop transformers runs): the same bf16 roundings and
    the same accumulation order, so the same numbers; tokens sharing an expert, rows not a multiple of 32."""
    from qwen35.model.mlp import Experts, Router

    if lin.cpu_kernels() is None:
        pytest.skip("CPU kernels could not be compiled here")
    gen = torch.Generator().manual_seed(tokens)
    E, H, inner, k = 16, 80, 48, 4
    experts = Experts(E, H, inner)
    router = Router(H, E, k)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * inner, H, generator=gen) * 0.2)
        experts.down_proj.copy_(torch.randn(E, H, inner, generator=gen) * 0.2)
        router.weight.copy_(torch.randn(E, H, generator=gen))
    experts, router = experts.bfloat16(), router.bfloat16()
    x = torch.randn(tokens, H, generator=gen).bfloat16()
    weights, ids = router(x)
    if tokens > 1:
        ids[1] = ids[0]  # two tokens choosing the same experts
    out = experts(x, weights, ids)
    assert torch.equal(out, lin.cpu_kernels().moe_experts_bf16(x, experts.gate_up_proj, experts.down_proj, ids,
                                                               weights))  # the kernel ran
    previous = lin.set_cpu_kernels(False)
    try:
        twin = experts(x, weights, ids)
    finally:
        lin.set_cpu_kernels(previous)
    torch.testing.assert_close(out.float(), twin.float(), rtol=1e-2, atol=1e-2)
    assert (out != twin).float().mean() < 0.02  # rounding ties at most, not a different computation


def test_moe_experts_kernel_rejects_bad_ids():
    k = lin.cpu_kernels()
    if k is None:
        pytest.skip("CPU kernels could not be compiled here")
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    gate_up, down = torch.zeros(4, 16, 32, dtype=torch.bfloat16), torch.zeros(4, 32, 8, dtype=torch.bfloat16)
    w = torch.ones(1, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="expert id 4 out of range"):
        k.moe_experts_bf16(x, gate_up, down, torch.tensor([[0, 4]]), w)
    with pytest.raises(RuntimeError, match="must be bf16"):
        k.moe_experts_bf16(x.float(), gate_up, down, torch.tensor([[0, 1]]), w)


@needs_kernels
@pytest.mark.parametrize("n,L,hq,hkv,d", [(100, 100, 4, 2, 64), (37, 200, 8, 2, 256), (130, 130, 6, 6, 128),
                                          (64, 64, 2, 1, 64), (1, 77, 4, 1, 64), (200, 333, 3, 1, 192)])
def test_prefill_attention_kernel_equals_softmax(n, L, hq, hkv, d):
    """csrc/attention_prefill.cpp against fp64 causal softmax attention and against SDPA (its twin): query and
    key blocks cut mid-way, a prompt chunk over earlier context (L > n), strided q (a view of the projection)."""
    import torch.nn.functional as F

    if not kernels.prefill_attention_supported():
        pytest.skip("prefill_attention needs AVX512-BF16")
    gen = torch.Generator().manual_seed(n * 7 + L)
    wide = (torch.randn(n, hq, 2 * d, generator=gen) * 2).bfloat16()
    q = wide[..., :d]  # rows strided as the layer's [query | gate] split gives them
    k = (torch.randn(L, hkv, d, generator=gen) * 2).bfloat16()
    v = torch.randn(L, hkv, d, generator=gen).bfloat16()
    scale = d**-0.5
    got = kernels.prefill_attention(q, k, v, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (n, hq, d)
    g = hq // hkv
    allowed = torch.arange(L)[None, :] <= (L - n + torch.arange(n))[:, None]
    s = torch.einsum("ihd,jhd->hij", q.double(), k.double().repeat_interleave(g, 1)) * scale
    ref = torch.einsum("hij,jhd->ihd", s.masked_fill(~allowed, float("-inf")).softmax(-1),
                       v.double().repeat_interleave(g, 1))
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          attn_mask=allowed, scale=scale, enable_gqa=True)[0].transpose(0, 1)
    err, sdpa_err = float((got.double() - ref).abs().max()), float((sdpa.double() - ref).abs().max())
    assert err <= 1.5 * sdpa_err + 1e-3, (err, sdpa_err)  # as close as SDPA: bf16 output rounding
    torch.testing.assert_close(got.float(), sdpa.float(), rtol=2e-2, atol=2e-2)


@needs_kernels
def test_prefill_attention_kernel_rejects_bad_input():
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bf16 inputs"):
        kernels.prefill_attention(q.float(), q, q, 1.0)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        kernels.prefill_attention(q[..., :32], q[..., :32], q[..., :32], 1.0)
    with pytest.raises(RuntimeError, match="lengths"):
        kernels.prefill_attention(q, q[:2], q[:2], 1.0)
