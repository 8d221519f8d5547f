"""Sequences driven by hand through the engine's own allocator and model runner, without a scheduler or
sampling: each call names the new tokens of each sequence and gets the final hidden states back. Benchmarks
time the model's cache path with it, and tests hold that path to one plain forward.

    run = DirectRun(model, num_seqs=2, max_len=512)
    hidden, batch = run.forward({0: prompt_a, 1: prompt_b})   # prefill both in one varlen forward
    hidden, batch = run.forward({0: [tok_a], 1: [tok_b]})     # one decode step each
    run.restart(0)                                            # sequence 0 empty again (its memory freed)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from qwen35.engine.cache_manager import CacheManager, plan_cache
from qwen35.engine.model_runner import ModelRunner
from qwen35.engine.scheduler import SchedulerOutput
from qwen35.engine.sequence import bare_sequence
from qwen35.model.cache import CacheLayout, ForwardBatch


class DirectRun:
    def __init__(self, model: torch.nn.Module, num_seqs: int, max_len: int, block_size: int = 16,
                 extra_attention_layers: int = 0):
        """A pool that holds `num_seqs` sequences of up to `max_len` tokens each, and that many empty ones.
        `extra_attention_layers`: KV for layers past the model's own (1 to run its MTP layer)."""
        cfg = model.cache_config
        layout = CacheLayout.of(cfg, model.dtype, block_size, extra_attention_layers)
        blocks = -(-max_len // block_size)
        per_seq = 1 + -(-blocks // layout.blocks_per_region)
        self.plan = plan_cache(cfg, model.dtype, per_seq * num_seqs * layout.region_bytes, num_seqs, max_len,
                               block_size, extra_attention_layers=extra_attention_layers)
        self.model = model
        self.runner = ModelRunner(model, self.plan)
        self.cache = self.runner.cache  # the storage
        self.manager = CacheManager.for_plan(self.plan)
        self._ids = iter(range(1 << 62))
        self.seqs = [bare_sequence([], next(self._ids)) for _ in range(num_seqs)]

    def forward(self, chunks: Mapping[int, Sequence[int]], chained: Sequence[int] = ()) -> tuple[torch.Tensor,
                                                                                                  ForwardBatch]:
        """Append `chunks[i]` to sequence i and compute them all in one forward: the final hidden states
        [N, H] (sequence by sequence, in the order of `chunks`) and the batch. Sequences in `chained` run their
        tokens as chained decodes (a verify step: ForwardBatch.chains), the state after each token in a draft
        slot of its own (`seqs[i].draft_slots`) until `keep(i, n)`; the pool must hold those slots too."""
        work = SchedulerOutput()
        for i, toks in chunks.items():
            seq = self.seqs[i]
            seq.token_ids.extend(int(t) for t in toks)
            if seq.num_tokens > self.plan.max_model_len:
                raise ValueError(f"sequence {i} would hold {seq.num_tokens} tokens, more than the "
                                 f"{self.plan.max_model_len} this DirectRun was made for")
            self.manager.allocate(seq, seq.num_tokens)
            if i in chained and len(toks) > 1:
                seq.draft_slots = self.manager.take_draft_slots(len(toks) - 1)
                if len(seq.draft_slots) != len(toks) - 1:
                    raise ValueError(f"no room for {len(toks) - 1} draft slots of sequence {i}")
                work.drafts[len(work.seqs)] = [int(t) for t in toks[1:]]
                seq.token_ids[-(len(toks) - 1):] = []  # the drafts are not the sequence's tokens yet
            work.add(seq, len(toks))
        hidden, batch = self.runner.forward(work)
        for i, (seq, n) in enumerate(zip(work.seqs, work.num_tokens, strict=True)):
            if i in work.drafts:
                seq.token_ids.extend(work.drafts[i])
            seq.num_computed_tokens += n
        return hidden, batch

    def keep(self, i: int, n: int) -> None:
        """After a chained forward: sequence i keeps its first `n` chained tokens (the state after the n-th
        becomes its slot); the others are dropped."""
        seq = self.seqs[i]
        ran = len(seq.draft_slots) + 1
        self.manager.settle_draft_slots(seq, n)
        del seq.token_ids[seq.num_tokens - (ran - n):]
        seq.num_computed_tokens -= ran - n

    def hold(self, i: int, num_tokens: int) -> None:
        """Make sequence i hold `num_tokens` tokens (id 0) whose KV and state are whatever the memory holds
        (benchmarks fill it with random numbers: `fill_random`)."""
        seq = self.seqs[i]
        seq.token_ids.extend([0] * (num_tokens - seq.num_tokens))
        self.manager.allocate(seq, num_tokens)
        seq.num_computed_tokens = num_tokens

    def fill_random(self, seed: int = 0, state_scale: float = 0.02) -> None:
        """Random numbers in every region a sequence holds: N(0, 1) KV, N(0, state_scale) GDN states."""
        gen = torch.Generator().manual_seed(seed)
        cache, kinds = self.cache, self.manager.kind
        for r, kind in enumerate(kinds):
            views = {"kv": [*cache.k.values(), *cache.v.values()], "slot": [*cache.conv.values()],
                     "snapshot": []}.get(kind, [])
            scaled = list(cache.recurrent.values()) if kind == "slot" else []
            for t, scale in [(t, 1.0) for t in views] + [(t, state_scale) for t in scaled]:
                part = t[r]
                part.copy_((torch.randn(part.shape, generator=gen) * scale).to(part.dtype))

    def rewind(self, i: int, num_tokens: int) -> None:
        """Sequence i back to its first `num_tokens` tokens, keeping its blocks. For timing only: its GDN state
        stays what the later tokens made it (a recurrent state cannot be wound back)."""
        seq = self.seqs[i]
        del seq.token_ids[num_tokens:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)

    def restart(self, i: int) -> None:
        """Sequence i empty again, its slot and blocks back in the pool."""
        self.manager.free(self.seqs[i])
        self.seqs[i] = bare_sequence([], next(self._ids))

    @property
    def cache_bytes(self) -> int:
        return self.cache.bytes
