"""Continuous batching with chunked prefill and preemption by recompute.

Every step shares one token budget (`max_num_batched_tokens`) among sequences; a sequence's work is
"its tokens not yet in the cache": 1 for a decoding sequence, the rest of the prompt (in chunks) for a
prefilling one, prompt + generated tokens for one coming back from preemption. Order of service:
  1. running sequences that decode (one token each), oldest first: decodes are never starved by prefills;
  2. running sequences in the middle of their prefill, oldest first, each up to the remaining budget;
  3. waiting sequences, first come first served, while a slot, `max_num_seqs` and the budget allow.
When a running sequence needs a KV block and none is free, the newest running sequence not yet scheduled
this step is preempted: its slot and blocks are freed, its computed-token count is reset, and it goes back
to the front of the waiting queue, to be recomputed later. If there is no such sequence the one asking is
preempted itself. The oldest work always proceeds, so everything finishes as long as one sequence of
`max_model_len` tokens fits in the cache (checked when the engine starts). No new sequence is admitted in a
step that preempted.

With MTP speculative decoding a decoding sequence also brings its drafts (k + 1 rows: its last token and the
drafts after it, verified in one forward), once every running sequence has its chunk: from what is left of the
budget, and only while a block per running sequence stays free besides (each draft takes a region for the GDN
state after it). Fewer drafts, or none, when room is short: drafts never preempt.

A prefill chunk that stops inside the known tokens ends on the snapshot grid (absolute positions, multiples of
64; unless the budget does not reach the next grid point), with or without prefix caching, so that a run that
starts from a cached prefix computes the same GDN chunks as one that does not. With prefix caching a waiting
sequence first takes the longest cached prefix (`CacheManager.lookup`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwen35.engine.cache_manager import CacheManager
from qwen35.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """The work of one step: `num_tokens[i]` new tokens of `seqs[i]` after its `num_computed_tokens`."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # prefix-cache snapshots to take inside the chunks: {index in seqs: [(offset, slot, key)]}
    # (CacheManager.plan_snapshots, set by the engine once the step is scheduled)
    snapshots: dict = field(default_factory=dict)
    # speculative decoding: {index in seqs: the drafts it verifies} (their slots: the sequence's draft_slots);
    # its num_tokens counts its last token and those drafts
    drafts: dict = field(default_factory=dict)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order (oldest first)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted by an earlier one in this loop
                continue
            n = self._chunk(seq, seq.num_computed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + n, scheduled, out):
                continue  # it preempted itself
            self.cache.allocate(seq, seq.num_computed_tokens + n)
            out.add(seq, n)
            scheduled.add(id(seq))
            budget -= n
        # Drafts last, from what is left of the budget and the memory: they never cost a running sequence its
        # chunk or its room.
        for i, seq in enumerate(out.seqs):
            if budget == 0:
                break
            if seq.draft_ids and out.num_tokens[i] == 1 and seq.num_uncomputed_tokens == 1:
                drafts = self._draft_room(seq, budget)
                if drafts:
                    out.drafts[i] = drafts
                    out.num_tokens[i] += len(drafts)
                    budget -= len(drafts)

        if not out.preempted:
            self._admit(out, budget)
        return out

    def _draft_room(self, seq: Sequence, budget: int) -> list[int]:
        """As many of a decoding sequence's drafts as the token budget and the spare memory allow (a block per
        running sequence stays free besides: drafts never make anyone wait or be preempted); their slots go to
        `seq.draft_slots`."""
        drafts = seq.draft_ids[:budget]
        reserve = len(self.running)
        while drafts and not self.cache.can_allocate(seq, seq.num_tokens + len(drafts), reserve_blocks=reserve):
            drafts = drafts[:-1]
        if not drafts:
            return []
        self.cache.allocate(seq, seq.num_tokens + len(drafts))  # the blocks first: a slot takes a whole region
        seq.draft_slots = self.cache.take_draft_slots(len(drafts), reserve)
        return drafts[:len(seq.draft_slots)]

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[int], out: SchedulerOutput) -> bool:
        """Preempt until `seq` can hold `num_tokens`; False when `seq` had to be preempted itself."""
        while not self.cache.can_allocate(seq, num_tokens):
            victim = next((s for s in reversed(self.running) if s is not seq and id(s) not in scheduled), None)
            if victim is None:
                self._preempt(seq, out)
                return False
            self._preempt(victim, out)
        return True

    def _chunk(self, seq: Sequence, start: int, budget: int) -> int:
        """How many of `seq`'s tokens after `start` to compute this step, within `budget` (see the module
        docstring: chunk ends on the snapshot grid)."""
        end = min(seq.num_tokens, start + budget)
        grid = self.cache.grid
        if end < seq.num_tokens and end // grid * grid > start:
            end = end // grid * grid
        return end - start

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.cache.lookup(seq)
            start = hit.num_tokens if hit is not None else seq.num_computed_tokens
            n = self._chunk(seq, start, budget)
            # Keep a block per running sequence in hand so that admitting does not force the next step's
            # decodes to preempt right away (which would only waste the prefill done here).
            reserve = len(self.running) if self.running else 0
            if not self.cache.can_allocate(seq, start + n, reserve_blocks=reserve, hit=hit):
                break
            self.waiting.popleft()
            self.cache.allocate(seq, start + n, hit=hit)
            if seq.num_cached_tokens is None:  # what its first admission found (preemptions do not count)
                seq.num_cached_tokens = start
                self.cache.count_query(seq.num_prompt_tokens, start)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.add(seq, n)
            budget -= n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.cache.free(seq)
        seq.draft_ids = []
        seq.num_computed_tokens = 0  # recompute: prompt + generated tokens are prefilled again from zero state
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------------------------------------
    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its cache."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq)
        seq.status = SequenceStatus.FINISHED
