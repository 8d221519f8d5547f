"""Sampling on a batch of logits, one row per sequence, each with its own `SamplingParams`.

The steps and their order are those documented in `qwen35.engine.sampling`. Each function below is one
definition, usable alone (the tests hold them to plain reference implementations).

Randomness: the token is argmax(p / E) over exponential variates E (an exact sample of p: the "exponential
race"), the seed from `SamplingParams.seed` or, without one, from the engine's seed.
  * With top_k (1..KEYED_MAX_K), only the k best logits can win: the sampler takes them (torch.topk, ties at the
    k-th kept), applies min_p / top_p / the softmax to those alone, and draws their E as the pure function
    E(seed, step, token) of `engine/noise.py`: no work per vocabulary entry beyond the top-k itself.
    `sample_keyed_reference` is the same definition over the whole vocabulary (the twin tests hold it to).
    Such rows (and greedy ones) need no full logits at all: the model runner asks the head screen for the few
    tokens that can be among each row's k best (`ops/head_screen.CandidateLogits`, exact there), and the sampler
    applies the same masks, penalties and picks at those columns (`screen_k` says which rows can go that way).
  * Without top_k, a sequence has its own `torch.Generator` and draws one E per vocabulary entry each step.
Either way a step of a sequence uses the same randomness whatever the batch and the filters, so a seeded
request gives the same tokens alone or batched, chunked, preempted or verified by speculative decoding.

Structured output: a row's `allowed` mask (its grammar's tokens, `qwen35.engine.structured`) sets every other
logit to -inf before anything else, so forbidden tokens get probability 0 in every mode, and logprobs are those
of the masked distribution (what vLLM reports under a grammar). The noise drawn per step does not depend on the
mask, so seeded requests with grammars stay reproducible alone or batched.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from qwen35.engine.noise import exponential_keyed, exponential_row
from qwen35.engine.outputs import Logprob
from qwen35.engine.sampling import SAMPLING_EPS, SamplingParams
from qwen35.ops.head_screen import CandidateLogits

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------- definitions
def apply_penalties(logits: torch.Tensor, prompt_ids: Seq[int], output_ids: Seq[int], repetition_penalty: float,
                    frequency_penalty: float, presence_penalty: float) -> torch.Tensor:
    """One row [V]. Repetition over prompt + output tokens (positive logits divided, negative multiplied);
    frequency (times the count) and presence (once) over output tokens only. Returns a new tensor."""
    V = logits.shape[-1]
    logits = logits.clone()
    if repetition_penalty != 1.0:
        seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
        ids = [t for t in (*prompt_ids, *output_ids) if t < V]
        if ids:
            seen[torch.as_tensor(ids, device=logits.device)] = True
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if (frequency_penalty != 0.0 or presence_penalty != 0.0) and output_ids:
        ids = torch.as_tensor([t for t in output_ids if t < V], dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=V).to(logits.dtype)
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[n, V] logits, [n] min_p: drop tokens with probability < min_p * (best probability)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """[n, V] logits, [n] k (0 = all): keep logits >= the k-th largest (ties at the boundary are kept)."""
    V = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > V), V, top_k).long()
    kmax = int(k.max())
    top = torch.topk(logits, kmax, dim=-1).values  # sorted descending
    kth = top.gather(-1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[n, V] logits, [n] p: keep the smallest set of most likely tokens whose probability sum reaches p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p[:, None]
    drop_sorted[:, 0] = False  # the best token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def draw_noise(vocab_size: int, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """One step's noise of a sequence: V exponential variates from its generator (what sample_from_probs draws
    for its row)."""
    return torch.empty(vocab_size, dtype=torch.float32, device=device).exponential_(generator=generator)


def sample_from_probs(probs: torch.Tensor, generators: Seq[torch.Generator | None],
                      noises: Seq[torch.Tensor | None] | None = None) -> torch.Tensor:
    """[n, V] probabilities -> [n] token ids, row i drawn with generators[i] (exponential race), or with the
    noise row noises[i] drawn before (draw_noise) where one is given."""
    noise = torch.empty_like(probs)
    for i, g in enumerate(generators):
        if noises is not None and noises[i] is not None:
            noise[i] = noises[i]
        else:
            noise[i].exponential_(generator=g)
    return (probs / noise).argmax(dim=-1)


KEYED_MAX_K = 1024  # top_k up to this takes the keyed top-k path (beyond, the full-vocabulary one)


def keyed_noise(params: SamplingParams) -> bool:
    """Whether a sequence samples through the top-k path with keyed noise (no generator)."""
    return not params.greedy and 0 < params.top_k <= KEYED_MAX_K


def _filter_sorted(z: torch.Tensor, min_p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[m, C] scaled logits sorted descending per row (-inf past each row's kept ones): min_p, then top_p."""
    if bool((min_p > 0).any()):
        z = apply_min_p(z, min_p)
    if bool((top_p < 1.0).any()):
        probs = torch.softmax(z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= top_p[:, None]
        drop[:, 0] = False
        z = z.masked_fill(drop, NEG_INF)
    return z


def sample_keyed(logits: torch.Tensor, params: Seq[SamplingParams], keys: Seq[tuple[int, int]],
                 token_ids: torch.Tensor | None = None) -> list[int]:
    """[m, V] logits (masks and penalties applied), each row with top_k in 1..KEYED_MAX_K and its noise key
    (seed, step) -> the sampled token ids: temperature, min_p, top_k, top_p over the k best, then the race with
    keyed noise. Equal to `sample_keyed_reference` (the same over every vocabulary entry). `token_ids` [V]: the
    token of each column (ascending), when the columns are a few candidates (ops/head_screen.CandidateLogits)."""
    m, V = logits.shape
    k = torch.tensor([min(p.top_k, V) for p in params], device=logits.device)
    vals, ids = torch.topk(logits, int(k.max()), dim=-1)  # sorted descending
    kth = vals.gather(-1, (k - 1)[:, None])
    # every finite logit >= the k-th is kept (ties at the boundary, as apply_top_k keeps them); a row whose k-th
    # is -inf (fewer than k allowed tokens) keeps its finite ones (logits are never +inf or NaN past the model)
    count = (logits >= kth).sum(dim=-1)
    few = (kth[:, 0] == NEG_INF).nonzero().flatten().tolist()
    for i in few:
        count[i] = int(torch.isfinite(logits[i]).sum())
    width = int(count.max()) if m else 0
    if width > vals.shape[-1]:
        vals, ids = torch.topk(logits, width, dim=-1)
    vals, ids = vals[:, :max(width, 1)], ids[:, :max(width, 1)]
    keep = torch.arange(vals.shape[-1], device=logits.device)[None, :] < count[:, None]
    temp = torch.tensor([p.temperature for p in params], device=logits.device)
    z = (vals / temp[:, None]).masked_fill(~keep, NEG_INF)
    z = _filter_sorted(z, torch.tensor([p.min_p for p in params], device=logits.device),
                       torch.tensor([p.top_p for p in params], device=logits.device))
    probs = torch.softmax(z, dim=-1)
    if token_ids is not None:
        ids = token_ids[ids]
    noise = torch.stack([exponential_keyed(seed, step, ids[i]) for i, (seed, step) in enumerate(keys)])
    return ids.gather(-1, (probs / noise.to(probs.device)).argmax(dim=-1, keepdim=True)).flatten().tolist()


def sample_keyed_reference(logits: torch.Tensor, p: SamplingParams, key: tuple[int, int]) -> int:
    """The definition, one row [V]: the filters of the full-vocabulary path, the softmax over every entry, and the
    race with the keyed noise of every entry."""
    z = logits[None].float() / p.temperature
    if p.min_p > 0:
        z = apply_min_p(z, torch.tensor([p.min_p]))
    z = apply_top_k(z, torch.tensor([p.top_k]))
    if p.top_p < 1.0:
        z = apply_top_p(z, torch.tensor([p.top_p]))
    probs = torch.softmax(z, dim=-1)[0]
    return int((probs / exponential_row(key[0], key[1], logits.shape[-1])).argmax())


def screen_k(row: SamplerRow) -> int | None:
    """How many best logits this row's sampling needs (1 for greedy, top_k for keyed rows), when that is all it
    needs: no logprobs reported (they need the whole softmax). None otherwise: it needs the full logits."""
    p = row.params
    if p.logprobs is not None or (row.allowed is not None and row.masked_ids):
        return None  # (min_tokens may decline to mask a grammar row: not a fixed set to rule out up front)
    if p.greedy:
        return 1
    return p.top_k if row.noise_key is not None else None


def adjust_bounds(row: SamplerRow, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Row bounds [V] on its logits, moved in place as the sampler will move the logits: -inf where it masks
    (grammar, min_tokens), and the penalties (monotone in each logit) applied to both ends."""
    V = lo.shape[-1]
    if row.allowed is not None:
        banned = ~row.allowed[:V]
        lo[:banned.shape[0]].masked_fill_(banned, NEG_INF)
        hi[:banned.shape[0]].masked_fill_(banned, NEG_INF)
        lo[banned.shape[0]:] = NEG_INF
        hi[banned.shape[0]:] = NEG_INF
    if row.masked_ids:
        ids = [t for t in row.masked_ids if t < V]
        lo[ids] = NEG_INF
        hi[ids] = NEG_INF
    p = row.params
    if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        for b in (lo, hi):
            b.copy_(apply_penalties(b, row.prompt_ids, row.output_ids, p.repetition_penalty, p.frequency_penalty,
                                    p.presence_penalty))


def screen_edits(row: SamplerRow, V: int) -> tuple[torch.Tensor | None, list[int]]:
    """For `HeadScreen.top_k_fused`: (bool [V] of the tokens whose logits this row's edits move or mask, or None;
    the moved ones it may still pick, whose exact logits it needs)."""
    p = row.params
    penalised = p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    if row.allowed is None and not row.masked_ids and not penalised:
        return None, []
    ex = torch.zeros(V, dtype=torch.bool)
    if row.allowed is not None:
        n = min(V, row.allowed.shape[0])
        ex[:n] = ~row.allowed[:n]
        ex[n:] = True
    ids = [t for t in row.masked_ids if 0 <= t < V]
    if ids:
        ex[ids] = True
    include: list[int] = []
    if penalised:
        touched = set(row.output_ids) if p.repetition_penalty == 1.0 else {*row.prompt_ids, *row.output_ids}
        include = sorted(t for t in touched if 0 <= t < V)
        if include:  # those the mask already excludes stay out (one gather, not a tensor access per token)
            at = torch.as_tensor(include, dtype=torch.long)
            include = at[~ex[at]].tolist()
            ex[at] = True
    return ex, include


def apply_allowed(logits: torch.Tensor, allowed: Seq[torch.Tensor | None]) -> torch.Tensor:
    """[n, V] logits, one bool [V'] mask or None per row -> a copy with -inf wherever a mask says no (ids past a
    mask's length, the model's padding rows, are forbidden too)."""
    V = logits.shape[-1]
    keep = torch.ones(logits.shape, dtype=torch.bool)
    for i, mask in enumerate(allowed):
        if mask is not None:
            m = mask[:V]
            keep[i, :m.shape[0]] = m
            keep[i, m.shape[0]:] = False
    # one pass that writes the copy (a clone, then a fill, would go over the logits twice)
    return torch.where(keep.to(logits.device), logits, NEG_INF)


def _allowed_among(row: SamplerRow, ids: Seq[int]) -> int:
    return int(row.allowed[torch.as_tensor(ids)].sum()) if row.allowed is not None else 0


# ---------------------------------------------------------------------------------------------- the sampler
@dataclass
class SamplerRow:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    prompt_ids: Seq[int]
    output_ids: Seq[int]
    generator: torch.Generator | None
    masked_ids: Seq[int] = ()  # token ids that may not be sampled now (EOS/stop ids before min_tokens)
    noise: torch.Tensor | None = None  # this step's noise row, drawn before (speculative verification)
    allowed: torch.Tensor | None = None  # bool [V]: the only tokens its grammar allows now (structured output)
    noise_key: tuple[int, int] | None = None  # (seed, step) of keyed noise (top_k rows: engine/noise.py)

    @property
    def argmax_only(self) -> bool:
        """True when this row's token is the argmax of the raw logits and nothing else of the logits is reported:
        the model may then find the argmax without computing every logit (an exact shortcut). With `allowed`, the
        argmax over the allowed tokens (the head screen takes the mask: ops/head_screen.py)."""
        p = self.params
        return (p.greedy and p.logprobs is None and not self.masked_ids and p.repetition_penalty == 1.0
                and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # raw logprob of each chosen token (None when not asked)
    top_logprobs: list[dict[int, Logprob] | None]
    # rows per sampling sequence, in order (a verify step's sequence has one per position); None: one each
    rows: list[int] | None = None


def _columns(token_ids: torch.Tensor, ids: Seq[int]) -> list[int]:
    """The columns of `ids` among ascending `token_ids` (repeats kept; ids that are no column dropped)."""
    if not ids:
        return []
    t = torch.as_tensor(list(ids), dtype=torch.long)
    at = torch.searchsorted(token_ids, t).clamp_(max=len(token_ids) - 1)
    return at[token_ids[at] == t].tolist()


class Sampler:
    def __call__(self, logits: torch.Tensor | CandidateLogits, rows: list[SamplerRow]) -> SamplerOutput:
        if isinstance(logits, CandidateLogits):
            return self._sample_candidates(logits, rows)
        logits = logits.float()
        n, V = logits.shape
        masked = any(r.allowed is not None for r in rows)
        if masked:  # a copy, which the per-row edits below may then change in place
            logits = apply_allowed(logits, [r.allowed for r in rows])
        want_lp = [r.params.logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

        # Per-row edits (masks, penalties) before the batched part, on a copy (made once, when one is needed).
        if not masked and any(r.masked_ids or r.params.repetition_penalty != 1.0 or r.params.frequency_penalty != 0.0
                              or r.params.presence_penalty != 0.0 for r in rows):
            logits = logits.clone()
        for i, r in enumerate(rows):
            p = r.params
            if r.masked_ids:
                ids = [t for t in r.masked_ids if t < V]
                # min_tokens never empties a grammar's row (a complete grammar allows only EOS / stop ids)
                if ids and (r.allowed is None or bool(torch.isfinite(logits[i]).sum() > _allowed_among(r, ids))):
                    logits[i, ids] = NEG_INF
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                logits[i] = apply_penalties(logits[i], r.prompt_ids, r.output_ids, p.repetition_penalty,
                                            p.frequency_penalty, p.presence_penalty)

        chosen = torch.zeros(n, dtype=torch.long, device=logits.device)
        greedy_rows = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy_rows:
            idx = torch.as_tensor(greedy_rows, device=logits.device)
            chosen[idx] = logits[idx].argmax(dim=-1)
        keyed_rows = [i for i, r in enumerate(rows) if r.noise_key is not None]
        if keyed_rows:
            idx = torch.as_tensor(keyed_rows, device=logits.device)
            picked = sample_keyed(logits[idx], [rows[i].params for i in keyed_rows],
                                  [rows[i].noise_key for i in keyed_rows])
            chosen[idx] = torch.as_tensor(picked, device=logits.device)
        random_rows = [i for i, r in enumerate(rows)
                       if not r.params.greedy and r.noise_key is None]
        if random_rows:
            idx = torch.as_tensor(random_rows, device=logits.device)
            sub = logits[idx]
            ps = [rows[i].params for i in random_rows]
            temp = torch.tensor([p.temperature for p in ps], device=logits.device)
            sub = sub / temp[:, None]
            if any(p.min_p > 0 for p in ps):
                sub = apply_min_p(sub, torch.tensor([p.min_p for p in ps], device=logits.device))
            if any(p.top_k > 0 for p in ps):
                sub = apply_top_k(sub, torch.tensor([p.top_k for p in ps], device=logits.device))
            if any(p.top_p < 1.0 for p in ps):
                sub = apply_top_p(sub, torch.tensor([p.top_p for p in ps], device=logits.device))
            probs = torch.softmax(sub, dim=-1)
            chosen[idx] = sample_from_probs(probs, [rows[i].generator for i in random_rows],
                                            [rows[i].noise for i in random_rows])
        token_ids = chosen.tolist()

        lps: list[float | None] = [None] * n
        tops: list[dict[int, Logprob] | None] = [None] * n
        if raw_logprobs is not None:
            for i, r in enumerate(rows):
                if not want_lp[i]:
                    continue
                row = raw_logprobs[i]
                tok = token_ids[i]
                lp = float(row[tok]) if tok < V else NEG_INF
                lps[i] = lp
                d: dict[int, Logprob] = {}
                k = min(r.params.logprobs, V)
                if k:
                    vals, ids = torch.topk(row, k)
                    for rank, (v, t) in enumerate(zip(vals.tolist(), ids.tolist(), strict=True), start=1):
                        if v != NEG_INF:  # tokens a grammar forbids are no alternatives
                            d[t] = Logprob(v, rank)
                if tok not in d:
                    d[tok] = Logprob(lp, int((row > lp).sum()) + 1 if tok < V else None)
                tops[i] = d
        return SamplerOutput(token_ids, lps, tops)

    def _sample_candidates(self, cand: CandidateLogits, rows: list[SamplerRow]) -> SamplerOutput:
        """The rows `screen_k` admits (greedy or keyed top-k, no logprobs) from the head screen's candidate
        logits: the same edits as on the full logits, at the candidates' columns, and the same picks (the first
        maximum of a row is its lowest token id, as the columns ascend)."""
        vals, tids = cand.values, cand.token_ids
        if any(r.allowed is not None or r.masked_ids or r.params.repetition_penalty != 1.0
               or r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in rows):
            vals = vals.clone()
        for i, r in enumerate(rows):
            p = r.params
            if r.allowed is not None:
                mask = r.allowed[tids.clamp(max=len(r.allowed) - 1)] & (tids < len(r.allowed))
                vals[i].masked_fill_(~mask, NEG_INF)
            if r.masked_ids:  # (screen_k leaves grammar rows with masked ids to the full logits)
                vals[i, _columns(tids, r.masked_ids)] = NEG_INF
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                # the penalty of a column is that of its token: the history's ids become columns (others can
                # not reach this row's top k, penalised or not: the screen's bounds moved with the penalties)
                vals[i] = apply_penalties(vals[i], _columns(tids, r.prompt_ids), _columns(tids, r.output_ids),
                                          p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        chosen = tids[vals.argmax(dim=-1)].tolist()
        keyed = [i for i, r in enumerate(rows) if r.noise_key is not None]
        if keyed:
            picked = sample_keyed(vals[keyed], [rows[i].params for i in keyed], [rows[i].noise_key for i in keyed],
                                  token_ids=tids)
            for i, t in zip(keyed, picked, strict=True):
                chosen[i] = t
        n = len(rows)
        return SamplerOutput(chosen, [None] * n, [None] * n)


__all__ = ["Sampler", "SamplerRow", "SamplerOutput", "apply_allowed", "apply_penalties", "apply_min_p", "apply_top_k",
           "apply_top_p", "sample_from_probs", "draw_noise", "SAMPLING_EPS", "KEYED_MAX_K", "keyed_noise",
           "sample_keyed", "sample_keyed_reference"]
