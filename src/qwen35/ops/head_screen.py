"""Exact greedy tokens through an int8 screen of the head: half the head's bytes per decoded token.

The 0.8B's head (the tied embedding, 248320 x 1024) is a third of the bytes a decode step reads. A greedy
step only needs the argmax of the logits, not the logits, so it can read an int8 copy of the head instead,
with a bound per vocabulary row on how far its int8 logit can be from the bf16 one, and then compute exactly
(with the bf16 GEMV, the same call the full head would make) only the rows the bounds cannot rule out:

    w_i = s_i q_i + r_i                        int8 row q_i, scale s_i, residual r_i (stored: |r_i|)
    |exact_i - approx_i| <= |r_i| |x| + |s_i q_i| e_x + rounding           (Cauchy-Schwarz on each part)

with x the bf16 hidden state, e_x a bound on the kernel's int16 rounding of x, and "rounding" the fp32
accumulation error of both kernels (gamma_n bound, n = 4K, on sum |w_ij x_j| <= |w_i| |x|). With
lo_i / hi_i the interval around approx_i and L = max lo_i, a row with hi_i < L has an exact logit below
exact_j for the j that reached L, so it is not the argmax; every other row is a candidate, its exact logit is
computed, and the first (lowest id) maximum among them is the token: the same token as `argmax` over the full
fp32 logits, ties included (a non-candidate is strictly below the maximum).

On random 0.8B-shaped weights 8-30 rows stay candidates, so a greedy head costs the int8 read (~8 ms here)
instead of the bf16 one (~17 ms). Steps that need the logits themselves (sampling, penalties, logprobs, masked
tokens) read the bf16 head as before. `full_argmax` is the obviously correct twin the tests hold it to.

A grammar's mask (structured output) keeps greedy rows on the screen (`masked_argmax`): a forbidden row gets the
bounds (-inf, -inf), so L is the largest lower end among allowed rows and only allowed rows can be candidates;
the same argument gives the argmax of the masked logits. Cheaper first: where the unmasked argmax (the plain
screen) is allowed it is the masked one; a row allowing few tokens skips the int8 pass (its allowed rows are its
candidates).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen35.ops import cpu_kernels as _ck
from qwen35.ops.linear import GEMV_MAX_ROWS, linear
from qwen35.ops.quant.int8 import INT8_GEMV_MAX_ROWS, quantize_rows

SCREEN_MAX_ROWS = 32  # rows of one head_screen_candidates call (csrc/gemv.cpp kMaxScreen)

U32 = 2.0 ** -24  # fp32 unit roundoff
# More candidates than this (x all zero, a degenerate head): compute the full logits instead.
MAX_CANDIDATES = 4096
# A masked row allowing at most this many tokens computes them exactly instead of screening (reading 512 bf16 rows
# costs less than the int8 pass over the whole head).
FEW_ALLOWED = 512
ABS_SLACK = 1e-30


@dataclass
class CandidateLogits:
    """Logits of a few candidate tokens per row, for samplers that need only each row's k best: `values` [M, C]
    fp32, exact where a token is a candidate of that row and -inf at the batch's other candidates; `token_ids`
    [C] int64, ascending (so the first maximum of a row is its lowest token id, as over the full logits).
    Tokens outside `token_ids` lie strictly below the row's k-th best logit."""

    values: torch.Tensor
    token_ids: torch.Tensor

    def dense(self, vocab_size: int) -> torch.Tensor:
        """[M, V] logits, -inf outside the candidates (the form the full-logit sampler takes)."""
        out = torch.full((self.values.shape[0], vocab_size), float("-inf"))
        out[:, self.token_ids] = self.values
        return out


def head_screen_enabled() -> bool:
    """QWEN35_HEAD_SCREEN=0 turns the screen off (every greedy step then reads the bf16 head)."""
    return os.environ.get("QWEN35_HEAD_SCREEN", "1") != "0"


def full_argmax(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The twin: fp32 logits of the whole head, then argmax (first index on ties)."""
    return linear(x, weight, out_dtype=torch.float32).argmax(dim=-1)


def _identity(t: torch.Tensor) -> tuple[int, int]:
    """(storage address, version counter): either changes when the tensor is moved or written in place.
    Tensors made under torch.inference_mode have no version counter (and cannot be written outside it)."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:
        return t.data_ptr(), -1


class HeadScreen:
    """An int8 copy of a bf16 head [V, K] with per-row error bounds; `argmax(x)` = `full_argmax(x, weight)`."""

    def __init__(self, weight: torch.Tensor, block_rows: int = 4096):
        if weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise ValueError(f"HeadScreen needs a 2-D bf16 CPU weight, got {tuple(weight.shape)} {weight.dtype} "
                             f"on {weight.device}")
        self.weight = weight
        self._version = _identity(weight)
        V, K = weight.shape
        self.qweight, self.scale = quantize_rows(weight)
        # Per-row bound coefficients: bound_i = coef_r[i] * |x| + coef_x[i] * e_x. gamma covers the fp32
        # accumulation of both kernels; the norms are computed here in fp32 too, and each fp32 step (the
        # dequantised product, the difference, the sum of squares) is covered by 2 gamma (|w| + |deq|) more,
        # then everything is rounded up (relative 4 gamma). Worth ~10% of the bound; fp64 took 7x longer.
        g = K * U32 / (1 - K * U32)
        gamma = 4 * g
        self.coef_r = torch.empty(V, dtype=torch.float32)
        self.coef_x = torch.empty(V, dtype=torch.float32)
        for a in range(0, V, block_rows):
            w = weight[a:a + block_rows].float()
            deq = self.qweight[a:a + block_rows].float().mul_(self.scale[a:a + block_rows, None])
            w_norm, deq_norm = w.norm(dim=-1), deq.norm(dim=-1)
            rho = w.sub_(deq).norm(dim=-1)
            self.coef_r[a:a + block_rows] = (rho + (gamma + 2 * g) * (w_norm + deq_norm)) * (1 + 4 * g)
            self.coef_x[a:a + block_rows] = deq_norm * (1 + 4 * g)
        self.candidates_last: int = 0  # candidate rows of the last call (all batch rows), for tests and profiling

    @staticmethod
    def supported(weight: torch.Tensor) -> bool:
        """The screen needs a bf16 CPU head and the compiled kernels (the int8 and bf16 GEMVs)."""
        return (weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                and weight.is_contiguous() and _ck.kernels() is not None)

    def is_current(self) -> bool:
        """False once the head's storage moved or was written in place (the copy would be stale)."""
        return self._version == _identity(self.weight)

    def _x_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x as the bf16 GEMV multiplies it, in fp32; |x| and e_x per row, rounded up to fp32 [M])."""
        xf = x.to(torch.bfloat16).float().contiguous()
        xd = xf.double()
        x_norm = xd.norm(dim=-1)
        # int16 rounding of x in the VNNI kernel: at most max|x| / 65534 per element (doubled for the fp32
        # scale arithmetic); zero where the kernel multiplies fp32 x directly.
        e_x = 2 * math.sqrt(xf.shape[-1]) * xd.abs().amax(-1) / 65534 if _ck.kernels().int8_uses_int16_activations() \
            else torch.zeros_like(x_norm)
        return xf, (x_norm * (1 + 1e-6)).float(), (e_x * (1 + 1e-6)).float()

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(approx [M, V] int8 logits, bound [M, V]): the exact fp32 logit of row i lies in approx +- bound."""
        xf, x_norm, e_x = self._x_terms(x)
        approx = _ck.kernels().gemv_int8(xf, self.qweight, self.scale)
        # The relative slack of the coefficients covers the fp32 products and the sum here, and the fp32
        # evaluation of approx +- bound (a few ulps of |approx| <= |deq| |x|); plus an absolute term for
        # flush-to-zero (each of K products can lose < 2^-126).
        bound = torch.addcmul(self.coef_x * e_x[:, None], self.coef_r, x_norm[:, None])
        return approx, bound.add_(ABS_SLACK)

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        """The twin of the fused kernel: sorted ids of the rows whose exact logit may be the maximum of some
        batch row (upper end >= that row's largest lower end)."""
        approx, bound = self.bounds(x)
        lo_max = (approx - bound).amax(dim=-1, keepdim=True)
        return ((approx + bound) >= lo_max).any(dim=0).nonzero().flatten()

    def candidates_fused(self, x: torch.Tensor) -> torch.Tensor:
        """`candidates` in one pass over the int8 head (csrc/gemv.cpp, head_screen_candidates)."""
        xf, x_norm, e_x = self._x_terms(x)
        return _ck.kernels().head_screen_candidates(xf, self.qweight, self.scale, self.coef_r, self.coef_x, x_norm,
                                                    e_x, ABS_SLACK)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (M <= GEMV_MAX_ROWS) -> [M] token ids, equal to `full_argmax(x, weight)`."""
        return self.best(x)[1]

    def best(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] -> ([M] the largest fp32 logit, [M] its row: the first on ties), both exactly what the full
        logits give (a tensor-parallel rank compares its best with the others')."""
        M = x.shape[0]
        if SCREEN_MAX_ROWS < M <= GEMV_MAX_ROWS:  # in groups: each row's logits do not depend on the others
            parts = [self.best(x[i:i + SCREEN_MAX_ROWS]) for i in range(0, M, SCREEN_MAX_ROWS)]
            return torch.cat([v for v, _ in parts]), torch.cat([r for _, r in parts])
        if (not (0 < M <= min(SCREEN_MAX_ROWS, INT8_GEMV_MAX_ROWS)) or not bool(torch.isfinite(x).all())
                or len(rows := self.candidates_fused(x)) > MAX_CANDIDATES):
            # NaN/inf (the full logits say what argmax makes of them), or too many candidates
            return linear(x, self.weight, out_dtype=torch.float32).max(dim=-1)
        self.candidates_last = len(rows)  # sorted ascending: the first maximum below is the lowest token id
        # The same GEMV call (all M rows of x) as the full head, so each candidate's logit is bit-identical.
        # (A row that is a candidate only for another batch row is strictly below this row's maximum.)
        exact = linear(x, self.weight.index_select(0, rows), out_dtype=torch.float32)
        value, at = exact.max(dim=-1)
        return value, rows[at]

    def top_k_logits(self, x: torch.Tensor, ks: list[int],
                     adjust: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                     ) -> CandidateLogits | None:
        """x [M, K], k per row -> the fp32 logits of the tokens that may be among each row's k best, exact
        (bit-identical to the full head's), -inf at the other candidates of the batch: a token is kept for a row
        when its upper bound reaches the row's k-th largest lower bound, so every other one lies strictly below the
        row's k-th largest exact logit, and the row's top k (ties included), and all a sampler computes from it,
        equal those of the full logits. `adjust(i, lo, hi)` moves row i's bounds [V] in place as the caller will
        move its logits: monotonically (penalties), or to -inf (tokens it will mask). None where the bounds cannot
        narrow the rows down (non-finite x, too many candidates, more than GEMV_MAX_ROWS rows): then compute the
        full logits (the twin: tests hold the sampler's tokens from both together)."""
        M, V = x.shape[0], self.weight.shape[0]
        # (past GEMV_MAX_ROWS the full head is another GEMM, whose logits the candidates' GEMV would not match)
        if not 0 < M <= min(GEMV_MAX_ROWS, INT8_GEMV_MAX_ROWS) or not bool(torch.isfinite(x).all()):
            return None
        approx, bound = self.bounds(x)  # one pass over the int8 head
        lo = approx - bound
        hi = approx.add_(bound)
        if adjust is not None:
            for i in range(M):
                adjust(i, lo[i], hi[i])
        k = torch.tensor([min(max(1, kk), V) for kk in ks])
        kth = torch.topk(lo, int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])
        # (a row with fewer than k finite lower bounds keeps every token with a finite upper bound)
        cand = (hi >= kth) & (hi > float("-inf"))
        rows = cand.any(dim=0).nonzero().flatten()
        if len(rows) > MAX_CANDIDATES:
            return None
        self.candidates_last = len(rows)
        # the same GEMV call over the candidates as in `best` (bit-identical logits); each row keeps its own
        exact = linear(x, self.weight.index_select(0, rows), out_dtype=torch.float32)
        return CandidateLogits(exact.masked_fill_(~cand[:, rows], float("-inf")), rows)

    def top_k_fused(self, x: torch.Tensor, ks: list[int], excluded: list[torch.Tensor | None] | None = None,
                    include: list[list[int]] | None = None) -> CandidateLogits | None:
        """`top_k_logits` in one pass over the int8 head (csrc/gemv.cpp, head_screen_topk), for rows whose caller
        moves only a few logits: `excluded[i]` (bool [V] or None) the tokens row i will mask or move (penalties),
        which neither set its k-th lower bound nor become candidates through the screen, and `include[i]` the ones
        among them it may still pick (the penalised ones): computed exactly for row i whatever their bounds. Every
        other token keeps its raw logit, so the k-th largest lower bound over them lies at or below the row's k-th
        largest logit after the edits, and a token left out lies strictly below it. None where `top_k_logits`
        would give None."""
        M, V = x.shape[0], self.weight.shape[0]
        if not 0 < M <= min(GEMV_MAX_ROWS, INT8_GEMV_MAX_ROWS, SCREEN_MAX_ROWS) or not bool(torch.isfinite(x).all()):
            return None
        ex = None
        if excluded is not None and any(e is not None for e in excluded):
            ex = torch.zeros(M, V, dtype=torch.bool)
            for i, e in enumerate(excluded):
                if e is not None:
                    ex[i, :min(V, e.shape[0])] = e[:V]
        xf, x_norm, e_x = self._x_terms(x)
        k = torch.tensor([min(max(1, kk), V) for kk in ks], dtype=torch.long)
        rows, hi, lo_k = _ck.kernels().head_screen_topk(xf, self.qweight, self.scale, self.coef_r, self.coef_x,
                                                        x_norm, e_x, ABS_SLACK, k, ex)
        member = (hi.t() >= lo_k[:, None]) & (hi.t() > float("-inf"))  # [M, C] (hi is -inf where excluded)
        extra = sorted({t for ids in (include or ()) for t in ids if 0 <= t < V} - set(rows.tolist()))
        if extra:
            rows = torch.cat([rows, torch.as_tensor(extra, dtype=torch.long)])
            member = torch.cat([member, torch.zeros(M, len(extra), dtype=torch.bool)], dim=1)
            rows, order = rows.sort()
            member = member[:, order]
        if include is not None:
            for i, ids in enumerate(include):
                if ids:
                    member[i, torch.searchsorted(rows, torch.as_tensor([t for t in ids if 0 <= t < V]))] = True
        if len(rows) > MAX_CANDIDATES:
            return None
        self.candidates_last = len(rows)
        exact = linear(x, self.weight.index_select(0, rows), out_dtype=torch.float32)
        return CandidateLogits(exact.masked_fill_(~member, float("-inf")), rows)

    def masked_argmax(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x [M, K], allowed bool [M, V] (each row allows at least one token) -> [M] ids: for each row the argmax
        of its fp32 logits over its allowed tokens (the first on ties), equal to
        `full_argmax` over the logits with -inf where `allowed` is False."""
        M, V = x.shape[0], self.weight.shape[0]
        allowed = allowed[:, :V].to(torch.bool)
        if M > SCREEN_MAX_ROWS:
            return torch.cat([self.masked_argmax(x[i:i + SCREEN_MAX_ROWS], allowed[i:i + SCREEN_MAX_ROWS])
                              for i in range(0, M, SCREEN_MAX_ROWS)])
        if not bool(torch.isfinite(x).all()):
            logits = linear(x, self.weight, out_dtype=torch.float32)
            return logits.masked_fill(~allowed, float("-inf")).argmax(dim=-1)
        out = torch.empty(M, dtype=torch.long)
        settled = torch.zeros(M, dtype=torch.bool)
        cand = allowed.clone()  # a row allowing few tokens: those are its candidates
        wide = (allowed.sum(dim=-1) > FEW_ALLOWED).nonzero().flatten()
        if len(wide):
            # first the plain screen: where the unmasked argmax (the lowest id of the maximum) is allowed, it is
            # the masked argmax too, at the cost of an unmasked greedy row (inside a JSON string: nearly always)
            _, top = self.best(x[wide])
            hit = allowed[wide, top]
            out[wide[hit]] = top[hit]
            settled[wide[hit]] = True
            wide = wide[~hit]
            if len(wide):  # its argmax is forbidden: screen again with the mask
                approx, bound = self.bounds(x[wide])
                ok = allowed[wide]
                lo_max = (approx - bound).masked_fill(~ok, float("-inf")).amax(dim=-1, keepdim=True)
                cand[wide] = ok & ((approx + bound) >= lo_max)
        rest = (~settled).nonzero().flatten()
        if not len(rest):
            return out
        rows = cand[rest].any(dim=0).nonzero().flatten()
        if len(rows) > MAX_CANDIDATES * len(rest):
            logits = linear(x[rest], self.weight, out_dtype=torch.float32)
            out[rest] = logits.masked_fill(~allowed[rest], float("-inf")).argmax(dim=-1)
            return out
        self.candidates_last = len(rows)
        # one GEMV call over these rows' candidates (bit-identical to the full head's logits, as in `best`); each
        # row then takes the first maximum among its own candidates (rows ascending: the lowest id on ties)
        exact = linear(x[rest], self.weight.index_select(0, rows), out_dtype=torch.float32)
        exact.masked_fill_(~cand[rest][:, rows], float("-inf"))
        out[rest] = rows[exact.argmax(dim=-1)]
        return out


__all__ = ["HeadScreen", "full_argmax", "head_screen_enabled", "FEW_ALLOWED", "MAX_CANDIDATES"]
