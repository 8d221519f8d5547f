"""One forward for all the work of a step, over the hybrid cache, then sampling.

The scheduled tokens of every sequence are concatenated into one flat run (varlen); the model writes each
sequence's KV into its blocks and its GDN state into its slot. Logits are computed only for the sequences
that sample this step: those whose scheduled chunk reaches the end of their known tokens (a prefill chunk in
the middle of a prompt samples nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qwen35.engine.cache_manager import CachePlan
from qwen35.engine.sampler import Sampler, SamplerOutput, SamplerRow
from qwen35.engine.scheduler import SchedulerOutput
from qwen35.engine.sequence import Sequence
from qwen35.model.cache import ForwardBatch, HybridCache, text_positions


class ModelRunner:
    def __init__(self, model: torch.nn.Module, plan: CachePlan):
        self.model = model
        p = model.head_weight
        self.device, self.dtype = p.device, p.dtype
        self.vocab_size = model.config.text.vocab_size
        # Storage only: its own free lists are not used, the engine's CacheManager hands slots and blocks out.
        self.cache = HybridCache(model.config.text, plan.num_slots, plan.num_blocks, plan.block_size,
                                 dtype=self.dtype, device=self.device)
        self.sampler = Sampler()

    @torch.inference_mode()
    def run(self, work: SchedulerOutput, sampler_row: Callable[[Sequence], SamplerRow],
            ) -> tuple[list[Sequence], SamplerOutput | None]:
        """Forward the scheduled tokens, then sample for the sequences whose chunk ends their known tokens
        (`sampler_row(seq)` says how). Returns (the sequences that sampled, the sampler's result)."""
        ids: list[int] = []
        ctx: list[int] = []
        for seq, n in zip(work.seqs, work.num_tokens, strict=True):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            ctx.append(start)
        flat = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        batch = ForwardBatch(query_lens=list(work.num_tokens), context_lens=ctx,
                             positions=text_positions(ctx, list(work.num_tokens), self.device), cache=self.cache,
                             slots=[s.slot for s in work.seqs], block_tables=[s.block_table for s in work.seqs])
        hidden = self.model.forward_batch(flat, batch)

        sampling, last_rows = [], []
        for i, (seq, n) in enumerate(zip(work.seqs, work.num_tokens, strict=True)):
            if seq.num_computed_tokens + n == seq.num_tokens:
                sampling.append(seq)
                last_rows.append(batch.starts[i + 1] - 1)
        if not sampling:
            return [], None
        logits = self.model.compute_logits(hidden[torch.as_tensor(last_rows, device=self.device)])
        return sampling, self.sampler(logits, [sampler_row(s) for s in sampling])
