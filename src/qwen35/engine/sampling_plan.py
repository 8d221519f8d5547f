"""What a step samples, as plain data for the model runner: which sequences sample, at which rows of the flat
batch, and how (one `SamplerRow` per sampled position).

A sequence samples when its chunk ends its known tokens (the last chunk of a prompt, or a decode step). A verify
step's sequence (speculative decoding: `SchedulerOutput.drafts`) samples at every draft position and after the
last one; each of those rows counts the drafts before it as its history (penalties, min_tokens) and takes its own
noise (engine/sampler.py: keyed by position, or drawn from the sequence's generator ahead of time).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from qwen35.engine.sampler import SamplerRow, draw_noise
from qwen35.engine.scheduler import SchedulerOutput
from qwen35.engine.sequence import Sequence


@dataclass
class SamplingPlan:
    seqs: list[Sequence] = field(default_factory=list)  # the sequences that sample, in batch order
    rows: list[SamplerRow] = field(default_factory=list)  # one per sampled position
    head_rows: list[int] = field(default_factory=list)  # the flat batch rows of those positions
    per_seq: list[int] = field(default_factory=list)  # rows of each sampling sequence (its drafts + 1)

    @property
    def verified(self) -> bool:
        """Whether a sequence verifies drafts this step (more than one row)."""
        return any(n > 1 for n in self.per_seq)


def sampler_row(seq: Sequence, before: Seq[int], eos_token_ids: Seq[int], vocab_size: int,
                device: torch.device | str = "cpu") -> SamplerRow:
    """How to sample `seq`'s next token; `before`: drafts a verify step puts ahead of this position (they count
    as its history: penalties, min_tokens). A row of a sequence with a generator takes the sequence's next noise
    row: one a verify step left (`pending_noise`), or drawn now for a verify step's rows."""
    p = seq.params
    n_out = seq.num_output_tokens + len(before)
    masked: tuple[int, ...] = ()
    if n_out < p.min_tokens:
        masked = (*(() if p.ignore_eos else eos_token_ids), *p.stop_token_ids)
    # token lists are copied only for the penalties that read them (long contexts make copies costly)
    penalised = p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
    noise = None
    if not p.greedy and seq.generator is not None and (seq.pending_noise or seq.draft_slots):
        while len(seq.pending_noise) <= len(before):
            seq.pending_noise.append(draw_noise(vocab_size, seq.generator, device))
        noise = seq.pending_noise[len(before)]
    # only the repetition penalty reads the prompt (frequency and presence count output tokens)
    return SamplerRow(params=p, prompt_ids=seq.token_ids[:seq.num_prompt_tokens] if p.repetition_penalty != 1.0 else (),
                      output_ids=[*seq.output_token_ids, *before] if penalised else (), generator=seq.generator,
                      masked_ids=masked, noise=noise,
                      allowed=seq.grammar.allowed() if seq.grammar is not None else None,
                      noise_key=(seq.noise_seed, n_out) if seq.generator is None and not p.greedy else None)


def plan_sampling(work: SchedulerOutput, eos_token_ids: Seq[int], vocab_size: int,
                  device: torch.device | str = "cpu") -> SamplingPlan:
    plan = SamplingPlan()
    at = 0
    for i, (seq, n) in enumerate(zip(work.seqs, work.num_tokens, strict=True)):
        at += n
        drafts = work.drafts.get(i, ())
        if seq.num_computed_tokens + n - len(drafts) == seq.num_tokens:
            plan.seqs.append(seq)
            plan.head_rows.extend(range(at - 1 - len(drafts), at))
            plan.rows.extend(sampler_row(seq, drafts[:j], eos_token_ids, vocab_size, device)
                             for j in range(len(drafts) + 1))
            plan.per_seq.append(len(drafts) + 1)
    return plan


__all__ = ["SamplingPlan", "plan_sampling", "sampler_row"]
