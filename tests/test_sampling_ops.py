"""The sampler against straightforward reference implementations of each definition."""

from __future__ import annotations

import math

import pytest
import torch

from qwen35 import SamplingParams
from qwen35.engine.sampler import (
    Sampler,
    SamplerRow,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
)

torch.set_num_threads(1)


def _logits(n=6, V=50, seed=0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 2


def ref_top_k(row: list[float], k: int) -> set[int]:
    if k <= 0:
        return set(range(len(row)))
    kth = sorted(row, reverse=True)[k - 1]
    return {i for i, x in enumerate(row) if x >= kth}


def ref_top_p(row: list[float], p: float) -> set[int]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    probs = [x / z for x in e]
    keep, total = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -probs[i]):
        keep.add(i)
        total += probs[i]
        if total >= p:
            break
    return keep


def ref_min_p(row: list[float], min_p: float) -> set[int]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    top = max(e)
    return {i for i, x in enumerate(e) if x >= min_p * top}


def kept(t: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in t]


def test_top_k_matches_definition():
    x = _logits()
    ks = torch.tensor([1, 2, 5, 0, 50, 17])
    got = kept(apply_top_k(x, ks))
    for i in range(len(x)):
        assert got[i] == ref_top_k(x[i].tolist(), int(ks[i]))
    assert [len(s) for s in got] == [1, 2, 5, 50, 50, 17]


@pytest.mark.parametrize("seed", [0, 1])
def test_top_p_matches_definition(seed):
    x = _logits(seed=seed)
    ps = torch.tensor([0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
    got = kept(apply_top_p(x, ps))
    for i in range(len(x)):
        assert got[i] == ref_top_p(x[i].tolist(), float(ps[i])), i


def test_min_p_matches_definition():
    x = _logits()
    mp = torch.tensor([0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
    got = kept(apply_min_p(x, mp))
    for i in range(len(x)):
        assert got[i] == ref_min_p(x[i].tolist(), float(mp[i]))


def test_penalties_match_definition():
    V = 20
    row = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 3
    prompt, output = [1, 2, 2, 5], [5, 7, 7, 7, 9, 25]  # 25 is beyond V: ignored
    got = apply_penalties(row, prompt, output, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7)
    ref = row.tolist()
    for t in set(prompt + output):
        if t < V:
            ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t in set(output):
        if t < V:
            ref[t] -= 0.4 * output.count(t) + 0.7
    assert torch.allclose(got, torch.tensor(ref), atol=1e-6)


def _rows(params, n, gen_seed=None, **kw):
    return [SamplerRow(params=params, prompt_ids=[], output_ids=[],
                       generator=torch.Generator().manual_seed(gen_seed + i) if gen_seed is not None else None, **kw)
            for i in range(n)]


def test_greedy_is_argmax_and_seeded_sampling_reproduces():
    x = _logits(n=8, V=100)
    s = Sampler()
    greedy = s(x, _rows(SamplingParams(temperature=0), 8))
    assert greedy.token_ids == x.argmax(-1).tolist()
    hot = SamplingParams(temperature=1.5)
    a = s(x, _rows(hot, 8, gen_seed=10)).token_ids
    b = s(x, _rows(hot, 8, gen_seed=10)).token_ids
    c = s(x, _rows(hot, 8, gen_seed=99)).token_ids
    assert a == b and a != c


def test_filters_restrict_the_support():
    x = _logits(n=1, V=60, seed=4).expand(400, -1).contiguous()
    p = SamplingParams(temperature=1.0, top_k=5, top_p=0.6, min_p=0.05)
    g = torch.Generator().manual_seed(0)
    rows = [SamplerRow(params=p, prompt_ids=[], output_ids=[], generator=g) for _ in range(400)]
    toks = set(Sampler()(x, rows).token_ids)
    allowed = ref_min_p(x[0].tolist(), 0.05) & ref_top_k(x[0].tolist(), 5)
    sub = [x[0, i].item() if i in allowed else -math.inf for i in range(60)]
    allowed = allowed & ref_top_p(sub, 0.6)
    assert toks <= allowed and len(toks) == len(allowed)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_the_softmax(temperature):
    V, N = 8, 20000
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -2.0])
    g = torch.Generator().manual_seed(1234)
    rows = [SamplerRow(params=SamplingParams(temperature=temperature), prompt_ids=[], output_ids=[], generator=g)
            for _ in range(N)]
    toks = torch.tensor(Sampler()(base.expand(N, V).contiguous(), rows).token_ids)
    counts = torch.bincount(toks, minlength=V).double()
    expected = torch.softmax(base.double() / temperature, -1) * N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4
    assert chi2 < 30, (chi2, counts, expected)


def test_masked_ids():
    x = _logits(n=2, V=30)
    best = x.argmax(-1).tolist()
    rows = [SamplerRow(params=SamplingParams(temperature=0), prompt_ids=[], output_ids=[], generator=None,
                       masked_ids=[best[0], 1000]),
            SamplerRow(params=SamplingParams(temperature=0), prompt_ids=[], output_ids=[], generator=None)]
    out = Sampler()(x, rows)
    assert out.token_ids[0] != best[0] and out.token_ids[1] == best[1]


def test_logprobs_are_raw_log_softmax_with_ranks():
    x = _logits(n=1, V=40)
    p = SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5)
    out = Sampler()(x, [SamplerRow(params=p, prompt_ids=[int(x.argmax())], output_ids=[], generator=None)])
    lp = torch.log_softmax(x[0], -1)
    tok = out.token_ids[0]
    assert out.logprobs[0] == pytest.approx(float(lp[tok]))
    top = out.top_logprobs[0]
    order = lp.argsort(descending=True).tolist()
    for rank, t in enumerate(order[:3], start=1):
        assert top[t].rank == rank and top[t].logprob == pytest.approx(float(lp[t]))
    assert top[tok].rank == order.index(tok) + 1
