"""Who owns which part of the hybrid cache, and how big the cache is.

The storage (`qwen35.model.HybridCache`) has two pools:
  * KV blocks of `block_size` tokens for the full-attention layers: a sequence holds
    ceil(tokens / block_size) of them (its block table), growing as it generates;
  * GDN state slots (conv window + fp32 recurrent state of every linear-attention layer): one per running
    sequence, whatever its length; the slots no sequence holds keep prefix-cache snapshots.
`CacheManager` hands both out and takes them back. It never looks inside them (copying a snapshot in or out of
a slot is the storage's `copy_slot`): the model takes a sequence that starts at position 0 from zero state, so a
reused slot or block never leaks what it held before.

With prefix caching (`engine/prefix_cache.py`) a full KV block may be shared by every sequence whose tokens
begin alike: blocks are reference counted, and a block nobody holds stays cached (least recently used first
out) until its memory is wanted. A new sequence starts from the longest cached prefix on the snapshot grid.
Snapshots are taken at every grid point of a prompt (the model writes those inside a chunk straight into the
slots `plan_snapshots` chose; a chunk's end is copied after the step) and, while a sequence decodes, at its
latest grid point (one per sequence); after every step a sequence's newly full blocks are remembered.
Snapshots and live states share the slots: a sequence that needs a slot takes the least recently used
snapshot's. An image's or video's placeholder tokens are keyed by the picture's content.

Sizing (`plan_cache`): a memory budget is split into slots (at most `max_num_seqs`, at most half the budget)
and blocks (the rest). The plan must hold one sequence of `max_model_len` tokens, else the engine refuses to
start with a message saying what to change; without a `max_model_len` it is what the blocks hold (at most the
model's `max_position_embeddings`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen35.config import TextConfig
from qwen35.engine.prefix_cache import SNAPSHOT_GRID, BlockKey, PrefixHit, PrefixIndex, chain_keys
from qwen35.model.cache import HybridCache

log = logging.getLogger("qwen35")

#: default share of free memory given to the cache, and the cap on CPU (RAM is shared with everything else)
GPU_MEMORY_FRACTION = 0.9
CPU_MEMORY_FRACTION = 0.25
CPU_CACHE_CAP_BYTES = 4 << 30


class CacheManager:
    """Free lists of KV blocks and state slots, allocation per sequence, and the prefix cache's indexes."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int, enable_prefix_caching: bool = False,
                 copy_slot: Callable[[int, int], None] | None = None, grid: int = SNAPSHOT_GRID):
        self.num_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        # Stacks popped from the end: low ids first, which keeps the touched memory compact.
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.refs = [0] * num_blocks
        self.prefix: PrefixIndex | None = PrefixIndex(block_size, grid) if enable_prefix_caching else None
        self.copy_slot = copy_slot  # the storage's: copy_slot(src, dst) copies every GDN layer's state

    @property
    def prefix_caching(self) -> bool:
        return self.prefix is not None

    @property
    def grid(self) -> int:
        return self.prefix.grid if self.prefix is not None else SNAPSHOT_GRID

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence could get: the free ones and the cached ones nobody holds."""
        return len(self.free_blocks) + (len(self.prefix.evictable) if self.prefix is not None else 0)

    @property
    def num_free_slots(self) -> int:
        """Slots a sequence could get: the free ones and those holding snapshots."""
        return len(self.free_slots) + (len(self.prefix.snapshots) if self.prefix is not None else 0)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq, num_tokens: int, hit: PrefixHit | None = None) -> int:
        """More blocks `seq` needs to hold `num_tokens` tokens (after taking `hit`'s blocks)."""
        have = len(hit.blocks) if hit is not None else len(seq.block_table)
        return max(0, self.blocks_for(num_tokens) - have)

    # ---------------------------------------------------------------- prefix lookups
    def _keys(self, seq) -> list[BlockKey]:
        """The chain keys of `seq`'s full blocks of known tokens (extended as it grows); an image's or video's
        placeholder tokens count by the picture's content (`MultimodalPrompt.cache_tokens`)."""
        if len(seq.block_keys) < seq.num_tokens // self.block_size:
            mm = seq.request.mm
            ids = seq.token_ids if mm is None else mm.cache_tokens(seq.token_ids[:seq.num_prompt_tokens]) + \
                seq.token_ids[seq.num_prompt_tokens:]
            seq.block_keys = chain_keys(ids, self.block_size, seq.block_keys)
        return seq.block_keys

    def lookup(self, seq) -> PrefixHit | None:
        """The longest cached prefix `seq` can start from (a sequence with nothing computed yet; at least its
        last token is left to compute, for the logits)."""
        if self.prefix is None or seq.num_computed_tokens or seq.block_table:
            return None
        return self.prefix.longest_hit(self._keys(seq), seq.num_tokens - 1)

    def count_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        """A request's first admission: its prompt tokens looked up and those found cached."""
        if self.prefix is not None:
            self.prefix.queried_tokens += prompt_tokens
            self.prefix.hit_tokens += hit_tokens

    # ---------------------------------------------------------------- allocation
    def _available_blocks(self, hit: PrefixHit | None) -> int:
        n = self.num_free_blocks
        if hit is not None and self.prefix is not None:  # taking the hit's blocks makes them unavailable
            n -= sum(1 for b in hit.blocks if b in self.prefix.evictable)
        return n

    def can_allocate(self, seq, num_tokens: int, reserve_blocks: int = 0, hit: PrefixHit | None = None) -> bool:
        if seq.slot is None and self.num_free_slots == 0:
            return False
        return self.blocks_needed(seq, num_tokens, hit) + reserve_blocks <= self._available_blocks(hit)

    def allocate(self, seq, num_tokens: int, hit: PrefixHit | None = None) -> None:
        """Give `seq` a slot (if it has none) and blocks for `num_tokens` tokens; with `hit`, first the hit's
        blocks and its snapshot's state, and `seq` then counts the hit's tokens as computed."""
        if not self.can_allocate(seq, num_tokens, hit=hit):
            raise RuntimeError("CacheManager.allocate without room: the scheduler must check can_allocate")
        if hit is not None:
            self._take_hit(seq, hit)
        if seq.slot is None:
            seq.slot = self._take_slot()
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_block())

    def _take_hit(self, seq, hit: PrefixHit) -> None:
        assert self.prefix is not None and self.copy_slot is not None
        for b in hit.blocks:
            self._ref(b)
        seq.block_table = list(hit.blocks)
        src = self.prefix.snapshots[hit.snapshot]
        if self.free_slots or len(self.prefix.snapshots) > 1:
            self.prefix.touch_snapshot(hit.snapshot)  # not the one _take_slot evicts
            seq.slot = self._take_slot()
            self.copy_slot(src, seq.slot)
        else:  # the snapshot's own slot is the only one: the sequence takes it over
            seq.slot = self.prefix.pop_snapshot(hit.snapshot)
        seq.num_computed_tokens = hit.num_tokens
        seq.num_registered_blocks = len(hit.blocks)

    def _take_slot(self) -> int:
        if self.free_slots:
            return self.free_slots.pop()
        slot = self.prefix.pop_snapshot() if self.prefix is not None else None
        if slot is None:
            raise RuntimeError("no state slot left: the scheduler must check can_allocate")
        return slot

    def _take_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.pop()
        else:
            block = self.prefix.oldest_evictable_block() if self.prefix is not None else None
            if block is None:
                raise RuntimeError("no KV block left: the scheduler must check can_allocate")
            self.prefix.forget_block(block)
        self._ref(block)
        return block

    def _ref(self, block: int) -> None:
        if self.refs[block] == 0 and self.prefix is not None:
            self.prefix.evictable.pop(block, None)
        self.refs[block] += 1

    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.prefix is not None and block in self.prefix.key_of:
                self.prefix.evictable[block] = None  # cached, most recently used last
            else:
                self.free_blocks.append(block)

    def free(self, seq) -> None:
        for block in reversed(seq.block_table):
            self._unref(block)
        seq.block_table = []
        seq.num_registered_blocks = 0
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    # ---------------------------------------------------------------- snapshots inside a chunk
    def plan_snapshots(self, seqs, num_tokens) -> dict[int, list[tuple[int, int, BlockKey]]]:
        """For each scheduled prompt chunk, the grid points strictly inside it that have no snapshot yet, each
        with a slot to hold one (free slots first, then the least recently used snapshots'; the deepest points
        first where slots run short): {batch index: [(offset in the chunk, slot, key)]}. The model writes the
        states there (ForwardBatch.snapshots); `commit_snapshots` files them after the step."""
        prefix = self.prefix
        if prefix is None:
            return {}
        plans: dict[int, list[tuple[int, int, BlockKey]]] = {}
        for i, (seq, n) in enumerate(zip(seqs, num_tokens, strict=True)):
            start = seq.num_computed_tokens
            if n < 2:
                continue
            keys = self._keys(seq)
            points = range((start // prefix.grid + 1) * prefix.grid, start + n, prefix.grid)
            todo = [p for p in reversed(points) if p // self.block_size <= len(keys)
                    and keys[p // self.block_size - 1] not in prefix.snapshots]
            got = []
            for p in todo:
                slot = self.free_slots.pop() if self.free_slots else prefix.pop_snapshot()
                if slot is None:
                    break
                got.append((p - start, slot, keys[p // self.block_size - 1]))
            if got:
                plans[i] = sorted(got, key=lambda t: t[0])
        return plans

    def drop_snapshots(self, plans: dict[int, list[tuple[int, int, BlockKey]]]) -> None:
        """Give back the slots of snapshots planned for a step that failed."""
        for plan in plans.values():
            self.free_slots.extend(slot for _, slot, _ in plan)

    def commit_snapshots(self, plans: dict[int, list[tuple[int, int, BlockKey]]]) -> None:
        """File the snapshots the step wrote (after `cache_computed` registered their blocks)."""
        prefix = self.prefix
        for plan in plans.values():
            for _, slot, key in plan:
                if key in prefix.snapshots or key not in prefix.block_of:
                    self.free_slots.append(slot)  # a duplicate, or its blocks were not kept
                else:
                    prefix.add_snapshot(key, slot)

    # ---------------------------------------------------------------- after a step
    def cache_computed(self, seq) -> None:
        """Remember `seq`'s newly full blocks, and snapshot its state if its computed tokens end on the grid."""
        prefix = self.prefix
        if prefix is None or seq.slot is None:
            return
        done = seq.num_computed_tokens
        keys = self._keys(seq)
        for b in range(seq.num_registered_blocks, min(done // self.block_size, len(seq.block_table))):
            prefix.register_block(keys[b], seq.block_table[b])
        seq.num_registered_blocks = max(seq.num_registered_blocks, done // self.block_size)
        if done == 0 or done % prefix.grid:
            return
        key = keys[done // self.block_size - 1]
        if prefix.block_of.get(key) is None:
            return  # a snapshot is only of use with its prefix's blocks
        if key in prefix.snapshots:
            prefix.touch_snapshot(key)
            return
        decoding = done > seq.num_prompt_tokens
        slot = None
        if decoding and seq.decode_snapshot is not None:  # a sequence keeps only its latest while it decodes
            slot = prefix.pop_snapshot(seq.decode_snapshot)
        if slot is None:
            slot = self.free_slots.pop() if self.free_slots else prefix.pop_snapshot()  # else the LRU one
        seq.decode_snapshot = key if decoding else None
        if slot is None:
            return
        self.copy_slot(seq.slot, slot)
        prefix.add_snapshot(key, slot)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block and snapshot (blocks held by running sequences stay theirs)."""
        if self.prefix is None:
            return
        for block in list(self.prefix.key_of):
            held = self.refs[block] > 0
            self.prefix.forget_block(block)
            if not held:
                self.free_blocks.append(block)
        while self.prefix.snapshots:
            self.free_slots.append(self.prefix.pop_snapshot())

    def all_free(self) -> bool:
        """Every block and slot free or held only by the prefix cache (what an idle engine must show)."""
        return self.num_free_blocks == self.num_blocks and self.num_free_slots == self.num_slots

    def check(self) -> None:
        """Raise AssertionError if the books disagree (tests): each block free, cached-unheld or held by its
        reference count; each slot free, a snapshot or a live sequence's."""
        evictable = set(self.prefix.evictable) if self.prefix is not None else set()
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is twice in the free list"
        assert not (free & evictable), "a block both free and cached-unheld"
        for b in range(self.num_blocks):
            if self.refs[b] < 0:
                raise AssertionError(f"block {b} has reference count {self.refs[b]}")
            if self.refs[b] == 0:
                assert b in free or b in evictable, f"block {b} is unheld but neither free nor cached"
            else:
                assert b not in free and b not in evictable, f"block {b} is held and free"
        if self.prefix is not None:
            assert set(self.prefix.evictable) <= set(self.prefix.key_of), "an evictable block is not cached"
            assert all(self.prefix.block_of[k] == b for b, k in self.prefix.key_of.items())
            snaps = list(self.prefix.snapshots.values())
            assert len(set(snaps)) == len(snaps) and not (set(snaps) & set(self.free_slots))


@dataclass
class CachePlan:
    num_slots: int
    num_blocks: int
    block_size: int
    slot_bytes: int
    block_bytes: int
    budget_bytes: int
    max_model_len: int

    @property
    def total_bytes(self) -> int:
        return self.num_slots * self.slot_bytes + self.num_blocks * self.block_bytes

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block_size


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: CUDA's free memory, or on CPU the kernel's MemAvailable (no psutil)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other Unixes: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def default_cache_budget(device: torch.device) -> int:
    free = available_memory_bytes(device)
    if device.type == "cuda":
        return int(free * GPU_MEMORY_FRACTION)
    return int(min(free * CPU_MEMORY_FRACTION, CPU_CACHE_CAP_BYTES))


def plan_cache(cfg: TextConfig, dtype: torch.dtype, budget_bytes: int, max_num_seqs: int, max_model_len: int | None,
               block_size: int = 16, max_position_embeddings: int | None = None) -> CachePlan:
    """Split `budget_bytes` between state slots and KV blocks.

    Slots: at most `max_num_seqs`, at most half the budget, at least one. Blocks: the rest, but never more than
    the slots' sequences of `max_model_len` tokens could use (memory nobody can use is not taken).
    `max_model_len` None: the longest the blocks hold, at most `max_position_embeddings`.
    Raises ValueError when one sequence of `max_model_len` tokens does not fit.
    """
    slot_bytes = max(1, HybridCache.slot_bytes(cfg, dtype))
    block_bytes = max(1, HybridCache.token_kv_bytes(cfg, dtype) * block_size)
    num_slots = max(1, min(max_num_seqs, (budget_bytes // 2) // slot_bytes))
    if max_model_len is None:
        limit = max_position_embeddings or cfg.max_position_embeddings
        blocks = (budget_bytes - num_slots * slot_bytes) // block_bytes
        max_model_len = int(min(limit, blocks * block_size))
        if max_model_len < 2:
            raise ValueError(f"the cache budget ({budget_bytes / 2**20:.1f} MiB) cannot hold one sequence: "
                             f"{slot_bytes / 2**20:.2f} MiB of GDN state + {block_bytes / 2**10:.1f} KiB per KV block "
                             f"of {block_size} tokens; raise kv_cache_memory_bytes")
    blocks_per_seq = -(-max_model_len // block_size)
    need_one = slot_bytes + blocks_per_seq * block_bytes
    if budget_bytes < need_one:
        raise ValueError(
            f"the cache budget ({budget_bytes / 2**20:.1f} MiB) cannot hold one sequence of max_model_len="
            f"{max_model_len} tokens ({need_one / 2**20:.1f} MiB: {slot_bytes / 2**20:.2f} MiB of GDN state + "
            f"{blocks_per_seq} KV blocks of {block_bytes / 2**10:.1f} KiB); lower max_model_len or raise "
            f"kv_cache_memory_bytes")
    num_blocks = (budget_bytes - num_slots * slot_bytes) // block_bytes
    num_blocks = min(num_blocks, blocks_per_seq * num_slots)
    if num_blocks < blocks_per_seq:  # the slots took too much: give the longest sequence its room first
        num_blocks = blocks_per_seq
        num_slots = max(1, min(num_slots, (budget_bytes - num_blocks * block_bytes) // slot_bytes))
    return CachePlan(num_slots=int(num_slots), num_blocks=int(num_blocks), block_size=block_size,
                     slot_bytes=slot_bytes, block_bytes=block_bytes, budget_bytes=budget_bytes,
                     max_model_len=max_model_len)


__all__ = ["CacheManager", "CachePlan", "plan_cache", "default_cache_budget", "available_memory_bytes"]
