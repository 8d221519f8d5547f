"""The top-k sampling path (keyed noise over the k best logits) held to its definition over the whole
vocabulary, and through the engine: seeded requests give the same tokens alone, batched and preempted."""

from __future__ import annotations

import pytest
import torch
from test_engine_support import engine_llm, make_model, random_prompts, write_config

from qwen35 import SamplingParams
from qwen35.engine.sampler import Sampler, SamplerRow, keyed_noise, sample_keyed, sample_keyed_reference

CARD = dict(temperature=0.6, top_p=0.95, top_k=20)  # the model card's settings


@pytest.mark.parametrize("V", [40, 5000])
def test_keyed_path_equals_the_definition(V):
    g = torch.Generator().manual_seed(V)
    params = [SamplingParams(**CARD), SamplingParams(temperature=1.0, top_k=5, min_p=0.1),
              SamplingParams(temperature=0.7, top_k=50, top_p=0.8, min_p=0.05),
              SamplingParams(temperature=1.3, top_k=1), SamplingParams(temperature=0.9, top_k=V)]
    for trial in range(120):
        logits = torch.randn(len(params), V, generator=g) * 3
        if trial % 3 == 0:
            logits[:, ::7] = float("-inf")  # masked tokens (a grammar, min_tokens)
        if trial % 5 == 0:
            logits[1, :V - 3] = float("-inf")  # fewer allowed tokens than k
        if trial % 7 == 0:
            logits[0, :30] = logits[0].max()  # ties at the top (and at the k-th)
        keys = [(trial, j) for j in range(len(params))]
        assert sample_keyed(logits, params, keys) == \
            [sample_keyed_reference(logits[i], p, k) for i, (p, k) in enumerate(zip(params, keys, strict=True))]


def test_sampler_routes_top_k_rows_to_the_keyed_path():
    V = 300
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    top_k, full, greedy = SamplingParams(**CARD), SamplingParams(temperature=0.6, top_p=0.95), SamplingParams(
        temperature=0)
    assert keyed_noise(top_k) and not keyed_noise(full) and not keyed_noise(greedy)
    rows = [SamplerRow(top_k, (), (), None, noise_key=(9, 4)),
            SamplerRow(full, (), (), torch.Generator().manual_seed(2)),
            SamplerRow(greedy, (), (), None)]
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == sample_keyed_reference(logits[0], top_k, (9, 4))
    assert out.token_ids[2] == int(logits[2].argmax())


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return engine_llm(make_model(write_config(tmp_path_factory.mktemp("keyed") / "m")),
                      kv_cache_memory_bytes=1 << 22)


def test_seeded_top_k_requests_alone_batched_and_chunked(llm):
    prompts = random_prompts([5, 70, 33, 140])
    params = [SamplingParams(**CARD, seed=s, max_tokens=12, ignore_eos=True, presence_penalty=1.5 if s % 2 else 0)
              for s in range(len(prompts))]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params,
                                                                                            strict=True)]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert batched == alone
    # n > 1: each completion its own seed (seed + index), the first equal to the request alone
    many = llm.generate([prompts[0]], params[0].clone(n=3), use_tqdm=False)[0].outputs
    assert many[0].token_ids == alone[0] and len({tuple(c.token_ids) for c in many}) > 1


def test_top_k_sampling_follows_the_distribution(llm):
    """First tokens of many seeds against the target softmax over the top 3 (temperature 1): chi-square."""
    prompt = random_prompts([9], seed=5)[0]
    probe = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=3), use_tqdm=False)[0]
    tops = probe.outputs[0].logprobs[0]
    ids = sorted(tops, key=lambda t: tops[t].rank)[:3]
    p = torch.tensor([tops[t].logprob for t in ids]).softmax(0)
    n = 600
    outs = llm.generate([prompt] * n, [SamplingParams(temperature=1.0, top_k=3, seed=s, max_tokens=1)
                                       for s in range(n)], use_tqdm=False)
    counts = torch.tensor([sum(o.outputs[0].token_ids[0] == t for o in outs) for t in ids], dtype=torch.float)
    assert counts.sum() == n
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 13.8  # 2 degrees of freedom, 0.1% level


# ------------------------------------------------------------------------------------------ through the head screen
def _screen_rows(V: int, seed: int):
    """Rows of every kind the top-k head takes: keyed with penalties, greedy, greedy with a penalty, a grammar
    row, min_tokens masking EOS-like ids."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(V, generator=g) < 0.3
    hist = torch.randint(0, V, (40,), generator=g).tolist()
    card = SamplingParams(**CARD)
    pen = SamplingParams(**CARD, presence_penalty=1.5, repetition_penalty=1.3, frequency_penalty=-0.5)
    return [SamplerRow(card, (), (), None, noise_key=(seed, 3)),
            SamplerRow(pen, hist[:20], hist[20:], None, noise_key=(seed, 7)),
            SamplerRow(SamplingParams(temperature=0), (), (), None),
            SamplerRow(SamplingParams(temperature=0, presence_penalty=-2.0), (), hist, None),
            SamplerRow(card, (), (), None, noise_key=(seed, 1), allowed=allowed),
            SamplerRow(SamplingParams(**CARD, min_tokens=5), (), (), None, noise_key=(seed, 2),
                       masked_ids=tuple(range(0, V, 11)))]


@pytest.mark.skipif(__import__("qwen35.ops.cpu_kernels", fromlist=["kernels"]).kernels() is None,
                    reason="the CPU kernels could not be built")
@pytest.mark.parametrize("V,K", [(5003, 200), (3000, 77)])
def test_screened_top_k_logits_sample_as_the_full_logits(V, K):
    """The sampler makes the same tokens of the screen's top-k logits (exact at the candidates, -inf elsewhere)
    as of the full fp32 logits, for every kind of row, batched beyond one screen call (8 rows)."""
    from qwen35.engine.sampler import adjust_bounds, screen_edits, screen_k
    from qwen35.ops.head_screen import HeadScreen
    from qwen35.ops.linear import linear

    g = torch.Generator().manual_seed(V)
    w = (torch.randn(V, K, generator=g) * 0.02).to(torch.bfloat16)
    screen = HeadScreen(w)
    sampler = Sampler()
    for seed in range(6):
        rows = _screen_rows(V, seed) * 2  # 12 rows
        x = (torch.randn(len(rows), K, generator=g) * (1 + seed)).to(torch.bfloat16)
        ks = [screen_k(r) for r in rows]
        assert all(k is not None for k in ks)
        cand = screen.top_k_logits(x, ks, lambda i, lo, hi, rows=rows: adjust_bounds(rows[i], lo, hi))
        full = linear(x, w, out_dtype=torch.float32)
        assert cand is not None and screen.candidates_last == len(cand.token_ids) < V // 4
        assert torch.equal(cand.token_ids, cand.token_ids.sort().values)
        screened = cand.dense(V)
        kept = torch.isfinite(screened)
        assert torch.equal(screened[kept], full[kept])  # bit-identical where kept
        want = sampler(full, rows).token_ids
        assert sampler(cand, rows).token_ids == want  # the compact path
        assert sampler(screened, rows).token_ids == want  # and its dense form through the full-logit path
        # the fused kernel (one pass, edited tokens excluded from the bounds and computed exactly)
        edits = [screen_edits(r, V) for r in rows]
        fused = screen.top_k_fused(x, ks, [e for e, _ in edits], [i for _, i in edits])
        assert fused is not None and len(fused.token_ids) < V // 4
        dense = fused.dense(V)
        kept = torch.isfinite(dense)
        assert torch.equal(dense[kept], full[kept])
        assert sampler(fused, rows).token_ids == want
    # rows the screen cannot serve: logprobs, and a grammar row with min_tokens masking
    assert screen_k(SamplerRow(SamplingParams(**CARD, logprobs=2), (), (), None, noise_key=(0, 0))) is None
    assert screen_k(SamplerRow(SamplingParams(temperature=0.6, top_p=0.9), (), (), torch.Generator())) is None


def test_engine_sampled_tokens_are_the_same_with_and_without_the_screen(tmp_path, monkeypatch):
    """End to end in bf16: seeded requests at the model card's settings (with and without penalties, with greedy
    and logprob rows beside them) give the same tokens with the top-k screen as with the full logits."""
    from qwen35.ops import cpu_kernels

    if cpu_kernels.kernels() is None:
        pytest.skip("the CPU kernels could not be built")
    model = make_model(write_config(tmp_path / "m", vocab_size=6000, tie_word_embeddings=True)).to(torch.bfloat16)
    prompts = random_prompts([3, 40, 17, 64, 9], vocab=6000)
    params = [SamplingParams(**CARD, seed=1, max_tokens=10, ignore_eos=True),
              SamplingParams(**CARD, seed=2, max_tokens=10, ignore_eos=True, presence_penalty=1.5),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(**CARD, seed=4, max_tokens=10, ignore_eos=True, repetition_penalty=1.2),
              SamplingParams(**CARD, seed=5, max_tokens=10, ignore_eos=True, logprobs=1)]

    def run(screen: bool):
        monkeypatch.setenv("QWEN35_HEAD_SCREEN", "1" if screen else "0")
        llm = engine_llm(model, kv_cache_memory_bytes=1 << 24)
        calls = []
        if screen:
            real = model._head_screen.top_k_fused
            monkeypatch.setattr(model._head_screen, "top_k_fused", lambda *a: calls.append(1) or real(*a))
        batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        four = [o.outputs[0].token_ids for o in llm.generate(prompts[:4], params[:4], use_tqdm=False)]
        return batched, four, calls

    on, on_four, calls = run(True)
    off, off_four, _ = run(False)
    assert on == off and on_four == off_four and on_four == on[:4]
    assert calls  # the four-row steps (no logprob row) went through the screen
