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
