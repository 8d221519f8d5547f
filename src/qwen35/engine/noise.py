"""Counter-based sampling noise: the exponential variate of token t at step s of a sequence with seed k is a
pure function E(k, s, t), not a draw from a stream.

The sampler picks argmax_t p_t / E_t (the "exponential race": an exact sample of p). With a stream generator
every step had to draw one variate per vocabulary entry (248,320) in order, whatever the few tokens that can
win; keyed variates cost only the tokens asked for, so a step that knows its top-k candidates draws k of them,
and the race over any superset of the tokens with p_t > 0 gives the same token. The key keeps what seeded
requests rely on: the same tokens alone or batched, chunked, preempted, or verified k positions at a time
(position j of a speculative verify step is step s + j).

The hash is SplitMix64's finaliser applied twice, first to (seed, step), then with the token id mixed in: its
output bits pass BigCrush as a counter-based generator; 53 of them make a uniform u in (0, 1), and E = -log u.
`exponential_keyed` is the whole definition; `uniform_keyed` is exposed for the statistical tests.
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit constant as the int64 torch stores (two's complement)."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _C1, _C2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_TOKEN_KEY = _signed(0xD6E8FEB86659FD93)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 lanes (torch shifts int64 arithmetically)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 lanes (multiplications wrap modulo 2^64, as in C)."""
    z = (z ^ _shr(z, 30)) * _signed(_C1)
    z = (z ^ _shr(z, 27)) * _signed(_C2)
    return z ^ _shr(z, 31)


def _step_key(seed: int, step: int) -> int:
    """The per-(seed, step) key: SplitMix64's finaliser on seed * golden + step + 1, in exact integers."""
    z = (seed * _GOLDEN + step + 1) & _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return _signed(z ^ (z >> 31))


def uniform_keyed(seed: int, step: int, token_ids: torch.Tensor) -> torch.Tensor:
    """U(0, 1) variates (float64, never 0 or 1) for `token_ids` (int64, any shape) at (seed, step)."""
    z = _mix((token_ids.to(torch.int64) * _TOKEN_KEY) ^ _step_key(seed, step))
    return (_shr(z, 11).to(torch.float64) + 0.5) * (2.0 ** -53)


def exponential_keyed(seed: int, step: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) variates (float32) for `token_ids` at (seed, step): the noise the sampler divides p by."""
    return uniform_keyed(seed, step, token_ids).log().neg_().to(torch.float32)


def exponential_row(seed: int, step: int, vocab_size: int) -> torch.Tensor:
    """The noise of every vocabulary entry [V] at (seed, step) (the full-logits path)."""
    return exponential_keyed(seed, step, torch.arange(vocab_size, dtype=torch.int64))


__all__ = ["exponential_keyed", "exponential_row", "uniform_keyed"]
