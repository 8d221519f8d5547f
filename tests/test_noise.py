"""Counter-based sampling noise (qwen35.engine.noise): a pure function of (seed, step, token), uniform and
independent enough that the exponential race it drives samples the right distribution."""

from __future__ import annotations

import math
import random

import torch

from qwen35.engine.noise import _M64, _mix, exponential_keyed, uniform_keyed


def _splitmix_finaliser(z: int) -> int:
    """SplitMix64's finaliser in Python's exact integers: the reference of the int64 tensor version."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def test_tensor_hash_equals_exact_integers():
    rng = random.Random(0)
    xs = [rng.getrandbits(64) for _ in range(2000)] + [0, 1, _M64, 1 << 63]
    t = torch.tensor([x - (1 << 64) if x >= 1 << 63 else x for x in xs], dtype=torch.int64)
    assert [v & _M64 for v in _mix(t).tolist()] == [_splitmix_finaliser(x) for x in xs]


def test_a_pure_function_of_the_key():
    ids = torch.tensor([5, 17, 248319, 0])
    a = exponential_keyed(123, 7, ids)
    assert torch.equal(a, exponential_keyed(123, 7, ids))
    assert torch.equal(a[[1, 3]], exponential_keyed(123, 7, ids[[1, 3]]))  # any subset, any order
    assert not torch.equal(a, exponential_keyed(123, 8, ids))
    assert not torch.equal(a, exponential_keyed(124, 7, ids))
    assert bool((a > 0).all())


def _ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of u to U(0, 1)."""
    s = torch.sort(u.double()).values
    n = len(s)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - s, s - (i - 1) / n).max())


def test_uniform_across_tokens_steps_and_seeds():
    n = 200_000
    crit = 1.95 / math.sqrt(n)  # 0.1% level
    assert _ks_uniform(uniform_keyed(1, 0, torch.arange(n))) < crit
    steps = torch.stack([uniform_keyed(2, s, torch.tensor([42])) for s in range(2000)]).flatten()
    assert _ks_uniform(steps) < 1.95 / math.sqrt(2000)
    seeds = torch.stack([uniform_keyed(s, 0, torch.tensor([7])) for s in range(2000)]).flatten()
    assert _ks_uniform(seeds) < 1.95 / math.sqrt(2000)
    # neighbouring tokens are not correlated
    u = uniform_keyed(3, 5, torch.arange(n)) - 0.5
    assert abs(float((u[1:] * u[:-1]).mean()) * 12) < 4 / math.sqrt(n)


def test_the_race_samples_the_distribution():
    """argmax p / E with keyed E draws each token with probability p (chi-square over 4000 seeds)."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    ids = torch.arange(5)
    counts = torch.zeros(5)
    n = 4000
    for seed in range(n):
        counts[int((p / exponential_keyed(seed, 0, ids)).argmax())] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 18.5  # 4 degrees of freedom, 0.1% level
