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
from qwen35.multimodal.inputs import VisionFeatureCache


class ModelRunner:
    def __init__(self, model: torch.nn.Module, plan: CachePlan):
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        self.vocab_size = model.config.text.vocab_size
        # Storage only: the engine's CacheManager decides which region is a slot, a snapshot or KV blocks.
        self.cache = HybridCache(model.cache_config, plan.num_regions, plan.block_size, dtype=self.dtype,
                                 device=self.device, extra_attention_layers=plan.extra_attention_layers)
        self.sampler = Sampler()
        self.head_screen = model.enable_head_screen()
        self.vision_cache = VisionFeatureCache()

    @torch.inference_mode()
    def forward(self, work: SchedulerOutput) -> tuple[torch.Tensor, ForwardBatch]:
        """Forward the scheduled tokens over the cache (the GDN layers write the states `work.snapshots` asks
        for on the way): the final hidden states [N, H] of the flat batch, and the batch."""
        ids: list[int] = []
        ctx: list[int] = []
        for seq, n in zip(work.seqs, work.num_tokens, strict=True):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            ctx.append(start)
        flat = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        lens = list(work.num_tokens)
        if any(s.request.mm is not None for s in work.seqs):
            positions, embeds = self._multimodal_inputs(work, flat, ctx)
        else:
            positions, embeds = text_positions(ctx, lens, self.device), None
        batch = ForwardBatch(query_lens=lens, context_lens=ctx, positions=positions, cache=self.cache,
                             slots=[s.slot for s in work.seqs], block_tables=[s.block_table for s in work.seqs],
                             snapshots={i: [(o, slot) for o, slot, _ in plan] for i, plan in work.snapshots.items()})
        return self.model.forward_batch(flat, batch, inputs_embeds=embeds), batch

    @torch.inference_mode()
    def run(self, work: SchedulerOutput, sampler_row: Callable[[Sequence], SamplerRow],
            ) -> tuple[list[Sequence], SamplerOutput | None]:
        """`forward`, then sample for the sequences whose chunk ends their known tokens (`sampler_row(seq)`
        says how). Returns (the sequences that sampled, the sampler's result)."""
        hidden, batch = self.forward(work)

        sampling, last_rows = [], []
        for i, (seq, n) in enumerate(zip(work.seqs, work.num_tokens, strict=True)):
            if seq.num_computed_tokens + n == seq.num_tokens:
                sampling.append(seq)
                last_rows.append(batch.starts[i + 1] - 1)
        if not sampling:
            return [], None
        rows = [sampler_row(s) for s in sampling]
        last = hidden[torch.as_tensor(last_rows, device=self.device)]
        if self.head_screen and all(r.argmax_only for r in rows):
            # Greedy steps: the argmax without the full logits (exact; qwen35.ops.head_screen).
            tokens = self.model.greedy_tokens(last).tolist()
            tokens = [t if r.forced is None else r.forced for t, r in zip(tokens, rows, strict=True)]
            return sampling, SamplerOutput(tokens, [None] * len(rows), [None] * len(rows))
        return sampling, self.sampler(self.model.compute_logits(last, torch.float32), rows)

    def _multimodal_inputs(self, work: SchedulerOutput, flat: torch.Tensor, ctx: list[int],
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions and embeddings with vision features for a step that holds image / video prompts.
        A chunk may start or end inside an image: each token takes its own feature row."""
        embeds = self.model.model.embed_tokens(flat)
        positions, at = [], 0
        for seq, start, n in zip(work.seqs, ctx, work.num_tokens, strict=True):
            mm = seq.request.mm
            if mm is None:
                positions.append(text_positions([start], [n], self.device))
            else:
                positions.append(mm.positions_for(start, start + n).to(self.device))
                index = mm.feature_index[start:min(start + n, seq.num_prompt_tokens)]
                rows = (index >= 0).nonzero().flatten()
                if len(rows):
                    if seq.request.mm_features is None:  # encoded once per request, on first need
                        seq.request.mm_features = self.vision_cache.for_prompt(self.model, mm)
                    embeds[at + rows.to(self.device)] = seq.request.mm_features[index[rows]].to(embeds.dtype)
            at += n
        return torch.cat(positions, dim=1), embeds
