"""MTP speculative decoding: the configuration, the drafter, and its counters.

Every Qwen3.5 checkpoint carries one MTP layer (`mtp.*`, model/mtp.py) trained to draft the token after next.
With `speculative_config={"method": "mtp", "num_speculative_tokens": k}` a decoding sequence brings its last
token and k drafts to a step; the target model verifies all k + 1 positions in one forward, each computed
exactly as a decode step would compute it (`ForwardBatch.chains`: chained decodes, the GDN state after each
position kept in a slot of its own, so rolling back is choosing a slot). The engine then keeps the longest run
of drafts the target agrees with, plus the target's own next token:
  * greedy: a draft is kept when it is the target's argmax;
  * sampling: each position's token is drawn from the target distribution with that sequence's next noise row
    (the exponential race of engine/sampler.py), and a draft is kept when it is the token drawn. The drafts
    are point masses, so this is rejection sampling (accept d with probability p(d); else a draw from p with d
    taken out, i.e. max(p - q, 0) renormalised), and the noise rows not used go back to the sequence: a seeded
    request gives the same tokens with MTP as without.
Then the MTP layer runs over the positions committed this step (its input at position i: the target's
final-norm hidden state there and the embedding of token i + 1; it keeps its own KV in the pool, as an extra
attention layer) and chains k drafts from the last one, each fed its own output hidden state and the draft
before it; drafts are the MTP head's argmax (through the exact head screen where it is on).
A sequence under a grammar (structured output) gets no drafts: its mask is only known one position at a time, so
it decodes one token per step while the others in the batch speculate (`LLMEngine._propose`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen35.model.cache import ForwardBatch

MTP_METHODS = ("mtp", "qwen3_5_mtp", "qwen3_next_mtp")  # vLLM's generic name and its per-model ones
MAX_SPECULATIVE_TOKENS = 4
CONFIG_KEYS = ("method", "num_speculative_tokens")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig | None:
        """vLLM's `speculative_config`: a dict, its JSON text, a SpeculativeConfig, or None (off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not JSON ({e}); expected e.g. "
                                 f"'{{\"method\": \"mtp\", \"num_speculative_tokens\": 2}}'") from None
        if not isinstance(value, Mapping):
            raise ValueError(f"speculative_config must be a dict like {{'method': 'mtp', 'num_speculative_tokens': "
                             f"2}}, got {type(value).__name__}")
        unknown = sorted(set(value) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown}; qwen35 takes {list(CONFIG_KEYS)} "
                             f"(the draft model is the checkpoint's own MTP layer)")
        method = value.get("method", "mtp")
        if method not in MTP_METHODS:
            raise ValueError(f"speculative_config: method {method!r} is not supported; expected 'mtp' (the "
                             f"checkpoint's multi-token-prediction layer)")
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        return cls("mtp", k)


@dataclass
class SpecDecodeStats:
    """What speculation did: verify steps, drafted and accepted tokens, acceptance by draft position."""

    num_speculative_tokens: int
    num_drafts: int = 0  # sequence-steps that brought drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_per_position = [0] * self.num_speculative_tokens
        self.drafted_per_position = [0] * self.num_speculative_tokens

    def record(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        for j in range(drafted):
            self.drafted_per_position[j] += 1
            if j < accepted:
                self.accepted_per_position[j] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verify step: the accepted drafts and the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"num_speculative_tokens": self.num_speculative_tokens, "num_drafts": self.num_drafts,
                "num_draft_tokens": self.num_draft_tokens, "num_accepted_tokens": self.num_accepted_tokens,
                "acceptance_rate": self.acceptance_rate, "mean_acceptance_length": self.mean_acceptance_length,
                "accepted_per_position": list(self.accepted_per_position),
                "drafted_per_position": list(self.drafted_per_position)}


@dataclass
class DraftWork:
    """One sequence's part of the drafter's pass after a step: its `kept` rows committed this step (flat rows
    `row`.., positions `start`..), and how many drafts to chain from the last of them (0: only fill the MTP
    layer's KV, e.g. for a prompt chunk that samples nothing)."""

    seq: Any
    row: int
    start: int
    kept: int
    num_drafts: int


def require_mtp(model: torch.nn.Module) -> None:
    """Raise ValueError unless `model` carries the MTP layer the drafter runs."""
    if getattr(model, "mtp", None) is None:
        raise ValueError("speculative_config method 'mtp' needs the checkpoint's MTP layer, but this model has "
                         "no mtp.* weights (a GGUF converted with --no-mtp, or a checkpoint saved without them)")


class MTPDrafter:
    """Runs the model's MTP head over a step's committed rows and chains drafts (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache, num_speculative_tokens: int):
        require_mtp(model)
        self.model, self.cache, self.k = model, cache, num_speculative_tokens

    @torch.inference_mode()
    def propose(self, hidden: torch.Tensor, positions: torch.Tensor, work: list[DraftWork]) -> list[list[int]]:
        """`hidden` [N, H] and `positions` [3, N]: the step's final hidden states and positions. Returns the drafts
        of every item (empty where num_drafts is 0); the MTP layer's KV is written on the way."""
        work = [w for w in work if w.kept > 0]
        if not work:
            return []
        model = self.model
        device = hidden.device
        rows = torch.cat([torch.arange(w.row, w.row + w.kept) for w in work]).to(device)
        tokens = [t for w in work for t in w.seq.token_ids[w.start + 1:w.start + 1 + w.kept]]
        batch = ForwardBatch(query_lens=[w.kept for w in work], context_lens=[w.start for w in work],
                             positions=positions[:, rows], cache=self.cache, slots=[w.seq.slot for w in work],
                             block_tables=[w.seq.block_table for w in work])
        ids = torch.as_tensor(tokens, dtype=torch.long, device=device)
        h = model.mtp(model.model.embed_tokens(ids), hidden[rows], batch)
        out: dict[int, list[int]] = {}
        chain = [i for i, w in enumerate(work) if w.num_drafts > 0]
        if chain:
            ends = torch.as_tensor([sum(w.kept for w in work[:i + 1]) - 1 for i in chain], device=device)
            h_last, pos_last = h[ends], batch.positions[:, ends]
            tok = model.greedy_tokens(h_last)
            drafts = {i: [t] for i, t in zip(chain, tok.tolist(), strict=True)}
            for j in range(1, max(work[i].num_drafts for i in chain)):
                keep = [n for n, i in enumerate(chain) if work[i].num_drafts > j]
                chain = [chain[n] for n in keep]
                h_last, pos_last, tok = h_last[keep], pos_last[:, keep], tok[keep]
                w_of = [work[i] for i in chain]
                step = ForwardBatch(query_lens=[1] * len(chain),
                                    context_lens=[w.start + w.kept - 1 + j for w in w_of],
                                    positions=pos_last + j, cache=self.cache, slots=[w.seq.slot for w in w_of],
                                    block_tables=[w.seq.block_table for w in w_of])
                h_last = model.mtp(model.model.embed_tokens(tok), h_last, step)
                tok = model.greedy_tokens(h_last)
                for i, t in zip(chain, tok.tolist(), strict=True):
                    drafts[i].append(t)
            out = drafts
        return [out.get(i, []) for i in range(len(work))]


def accepted_prefix(targets: list[int], drafts: list[int]) -> int:
    """How many drafts the target tokens confirm: the length of the run where targets[j] == drafts[j]."""
    n = 0
    while n < len(drafts) and targets[n] == drafts[n]:
        n += 1
    return n


__all__ = ["SpeculativeConfig", "SpecDecodeStats", "MTPDrafter", "DraftWork", "accepted_prefix", "require_mtp",
           "MTP_METHODS",
           "MAX_SPECULATIVE_TOKENS"]
