"""Who owns which part of the hybrid cache, and how big the cache is.

The storage (`qwen35.model.HybridCache`) is one pool of equal regions (`CacheLayout`); each region, as this
manager decides, is free, a GDN state slot (the conv window and fp32 recurrent state of every linear-attention
layer: one per running sequence, whatever its length), a prefix-cache snapshot (the same, of a prefix), or
`blocks_per_region` KV blocks of `block_size` tokens for the full-attention layers. So KV, live states and
snapshots share one budget: `max_num_seqs` only caps how many sequences run; how many do follows what fits. A
sequence holds one slot and ceil(tokens / block_size) blocks (its block table), growing as it generates.
`CacheManager` hands regions and blocks out and takes them back; it never looks inside them (copying a snapshot
in or out of a slot is the storage's `copy_slot`): the model takes a sequence that starts at position 0 from
zero state, so a reused region never leaks what it held before.

Free memory is counted in blocks: every region no running sequence holds gives `blocks_per_region`, less the
blocks running sequences hold in it. A sequence can be given a slot and k blocks when k + blocks_per_region
blocks are unheld and one region has no held block at all (exact: cached blocks and snapshots are evicted for
it). Blocks are taken from the lowest regions already holding KV, then from free regions (lowest first), then
by evicting the least recently used cached block or snapshot; slots from the highest free region, then the
least recently used snapshot or fully unheld KV region. A KV region whose blocks are all free is free again.

With prefix caching (`engine/prefix_cache.py`) a full KV block may be shared by every sequence whose tokens
begin alike: blocks are reference counted, and a block nobody holds stays cached until its memory is wanted.
A new sequence starts from the longest cached prefix on the snapshot grid. Snapshots are taken at every grid
point of a prompt (the model writes those inside a chunk straight into the regions `plan_snapshots` chose:
free ones, or older snapshots', never a cached block's, so a long prompt does not flush the KV of others; a
chunk's end is copied after the step, evicting whatever is least recently used) and, while a sequence decodes,
at its latest grid point (one per sequence); after every step a sequence's newly full blocks are remembered.
An image's or video's placeholder tokens are keyed by the picture's content.

Sizing (`plan_cache`): the budget is cut into regions; it must hold one sequence of `max_model_len` tokens
(a slot and its blocks), else the engine refuses to start with a message saying what to change; without a
`max_model_len` it is what the pool holds next to one slot (at most the model's `max_position_embeddings`).
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen35.config import TextConfig
from qwen35.engine.prefix_cache import SNAPSHOT_GRID, BlockKey, PrefixHit, PrefixIndex, chain_keys
from qwen35.model.cache import CacheLayout

log = logging.getLogger("qwen35")

#: default share of free memory given to the cache, and the cap on CPU (RAM is shared with everything else)
GPU_MEMORY_FRACTION = 0.9
CPU_MEMORY_FRACTION = 0.25
CPU_CACHE_CAP_BYTES = 4 << 30

FREE, SLOT, SNAPSHOT, KV = "free", "slot", "snapshot", "kv"  # what a region is


class CacheManager:
    """The pool's regions and KV blocks: allocation per sequence, reference counts, and the prefix cache."""

    def __init__(self, num_regions: int, blocks_per_region: int, block_size: int, enable_prefix_caching: bool = False,
                 copy_slot: Callable[[int, int], None] | None = None, grid: int = SNAPSHOT_GRID):
        if num_regions <= 0 or blocks_per_region <= 0 or block_size <= 0:
            raise ValueError(f"CacheManager needs positive num_regions, blocks_per_region, block_size; got "
                             f"{num_regions}, {blocks_per_region}, {block_size}")
        self.num_regions, self.blocks_per_region, self.block_size = num_regions, blocks_per_region, block_size
        self.num_blocks = num_regions * blocks_per_region
        self.kind = [FREE] * num_regions
        self.free_regions = list(range(num_regions))  # sorted: blocks come from the low end, slots from the high
        self.free_in: dict[int, list[int]] = {}  # KV region -> its free blocks (a stack: low ids come out first)
        self.open_regions: list[int] = []  # sorted: the KV regions with a free block
        self.refs = [0] * self.num_blocks
        self.held = [0] * num_regions  # blocks with references, per region
        self.cached = [0] * num_regions  # cached blocks nobody holds, per region
        self.region_tick = [0] * num_regions  # when a block of it was last let go (LRU between regions)
        self.num_live_slots = 0
        self.num_held_blocks = 0
        self.num_held_regions = 0  # KV regions with a held block
        self.prefix: PrefixIndex | None = PrefixIndex(block_size, grid) if enable_prefix_caching else None
        self.copy_slot = copy_slot  # the storage's: copy_slot(src, dst) copies every GDN layer's state

    @classmethod
    def for_plan(cls, plan: CachePlan, enable_prefix_caching: bool = False,
                 copy_slot: Callable[[int, int], None] | None = None) -> CacheManager:
        return cls(plan.num_regions, plan.blocks_per_region, plan.block_size, enable_prefix_caching, copy_slot)

    @property
    def prefix_caching(self) -> bool:
        return self.prefix is not None

    @property
    def grid(self) -> int:
        return self.prefix.grid if self.prefix is not None else SNAPSHOT_GRID

    @property
    def num_free_blocks(self) -> int:
        """Blocks sequences could still get (free, cached-unheld, or in regions no sequence holds)."""
        return self.blocks_per_region * (self.num_regions - self.num_live_slots) - self.num_held_blocks

    @property
    def num_free_slots(self) -> int:
        """State slots sequences could still get: regions without a live state or a held block."""
        return self.num_regions - self.num_live_slots - self.num_held_regions

    def region_of(self, block: int) -> int:
        return block // self.blocks_per_region

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
        last token is left to compute, for the logits). None for a request that wants prompt logprobs: cached
        positions have no logits (as vLLM, it computes its whole prompt; its blocks are still cached for others)."""
        if self.prefix is None or seq.num_computed_tokens or seq.block_table or \
                seq.request.params.prompt_logprobs is not None:
            return None
        return self.prefix.longest_hit(self._keys(seq), seq.num_tokens - 1)

    def count_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        """A request's first admission: its prompt tokens looked up and those found cached."""
        if self.prefix is not None:
            self.prefix.queried_tokens += prompt_tokens
            self.prefix.hit_tokens += hit_tokens

    # ---------------------------------------------------------------- allocation
    def can_allocate(self, seq, num_tokens: int, reserve_blocks: int = 0, hit: PrefixHit | None = None) -> bool:
        """Whether `seq` can hold `num_tokens` tokens (taking `hit` first) with `reserve_blocks` to spare."""
        blocks = self.blocks_needed(seq, num_tokens, hit) + reserve_blocks
        unheld, whole = self.num_free_blocks, self.num_free_slots
        if hit is not None:  # the hit's blocks nobody holds yet are held once taken
            taken = [b for b in hit.blocks if self.refs[b] == 0]
            unheld -= len(taken)
            whole -= len({self.region_of(b) for b in taken if self.held[self.region_of(b)] == 0})
        if seq.slot is None:
            return whole >= 1 and blocks + self.blocks_per_region <= unheld
        return blocks <= unheld

    def allocate(self, seq, num_tokens: int, hit: PrefixHit | None = None) -> None:
        """Give `seq` a slot (if it has none) and blocks for `num_tokens` tokens; with `hit`, first the hit's
        blocks and its snapshot's state, and `seq` then counts the hit's tokens as computed."""
        if not self.can_allocate(seq, num_tokens, hit=hit):
            raise RuntimeError("CacheManager.allocate without room: the scheduler must check can_allocate")
        if hit is not None:
            self._take_hit(seq, hit)
        if seq.slot is None:
            seq.slot = self._take_state_region(SLOT)
            if seq.slot is None:
                raise RuntimeError("no region left for a state slot: the scheduler must check can_allocate")
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_block())

    def _take_hit(self, seq, hit: PrefixHit) -> None:
        assert self.prefix is not None and self.copy_slot is not None
        for b in hit.blocks:
            self._ref(b)
        seq.block_table = list(hit.blocks)
        self.prefix.touch_snapshot(hit.snapshot)  # the most recently used: not the one evicted for the slot
        src = self.prefix.snapshots[hit.snapshot]
        slot = self._take_state_region(SLOT, keep=hit.snapshot)
        if slot is None:  # the snapshot's own region is the only one left: the sequence takes it over
            slot = self.prefix.pop_snapshot(hit.snapshot)
            self.kind[slot] = SLOT
            self.num_live_slots += 1
        else:
            self.copy_slot(src, slot)
        seq.slot = slot
        seq.num_computed_tokens = hit.num_tokens
        seq.num_registered_blocks = len(hit.blocks)

    def _take_state_region(self, kind: str, keep: BlockKey | None = None, evict_blocks: bool = True) -> int | None:
        """A region for a live state (SLOT) or a snapshot (SNAPSHOT): the highest free one, else the least
        recently used of the snapshots (but `keep`) and the KV regions without held blocks (their cached blocks
        are forgotten; not with `evict_blocks=False`). None when there is none."""
        region = self.free_regions.pop() if self.free_regions else None
        if region is None:
            region = self._evict_for_region(keep, evict_blocks)
            if region is None:
                return None
        self.kind[region] = kind
        if kind == SLOT:
            self.num_live_slots += 1
        return region

    def _evict_for_region(self, keep: BlockKey | None, evict_blocks: bool) -> int | None:
        prefix = self.prefix
        if prefix is None:
            return None
        snap = next(((k, prefix.snapshot_ticks[k]) for k in prefix.snapshots if k != keep), None)
        kv = None
        if evict_blocks:
            idle = [r for r in range(self.num_regions) if self.kind[r] == KV and self.held[r] == 0]
            if idle:
                r = min(idle, key=lambda r: self.region_tick[r])
                kv = (r, self.region_tick[r])
        if snap is not None and (kv is None or snap[1] <= kv[1]):
            region = prefix.pop_snapshot(snap[0])
            self.kind[region] = FREE
            return region
        if kv is None:
            return None
        r = kv[0]
        for b in range(r * self.blocks_per_region, (r + 1) * self.blocks_per_region):
            if b in prefix.key_of:
                prefix.forget_block(b)
        self.cached[r] = 0
        self._drop_kv(r)
        self.kind[r] = FREE
        return r

    def _take_block(self) -> int:
        """The lowest free block of a KV region, else a free region's first, else the least recently used
        cached block's or snapshot's memory."""
        while True:
            if self.open_regions:
                r = self.open_regions[0]
                block = self.free_in[r].pop()
                if not self.free_in[r]:
                    self.open_regions.pop(0)
                self._ref(block)
                return block
            if self.free_regions:
                self._make_kv(self.free_regions.pop(0))
                continue
            prefix = self.prefix
            old_block = prefix.oldest_evictable() if prefix is not None else None
            old_snap = prefix.oldest_snapshot() if prefix is not None else None
            if old_block is not None and (old_snap is None or old_block[1] <= old_snap[1]):
                self._forget_cached(old_block[0])
            elif old_snap is not None:
                self._free_region(prefix.pop_snapshot(old_snap[0]))
            else:
                raise RuntimeError("no KV block left: the scheduler must check can_allocate")

    def _make_kv(self, region: int) -> None:
        """A region taken off the free list holds KV blocks from now on, all free."""
        self.kind[region] = KV
        start = region * self.blocks_per_region
        self.free_in[region] = list(range(start + self.blocks_per_region - 1, start - 1, -1))
        bisect.insort(self.open_regions, region)

    def _drop_kv(self, region: int) -> None:
        """A KV region none of whose blocks is held or cached stops holding KV."""
        if self.free_in.pop(region):
            del self.open_regions[bisect.bisect_left(self.open_regions, region)]

    def _free_region(self, region: int) -> None:
        self.kind[region] = FREE
        bisect.insort(self.free_regions, region)

    def _forget_cached(self, block: int) -> None:
        """Evict a cached block nobody holds: its memory is free again."""
        r = self.region_of(block)
        self.prefix.forget_block(block)
        self.cached[r] -= 1
        self._release_block(block)

    def _release_block(self, block: int) -> None:
        r = self.region_of(block)
        free = self.free_in[r]
        free.append(block)
        if len(free) == 1:
            bisect.insort(self.open_regions, r)
        if self.held[r] == 0 and self.cached[r] == 0:  # nothing left in it: the region is free again
            self._drop_kv(r)
            self._free_region(r)

    def _ref(self, block: int) -> None:
        r = self.region_of(block)
        if self.refs[block] == 0:
            if self.prefix is not None and self.prefix.evictable.pop(block, None) is not None:
                self.cached[r] -= 1
            self.num_held_blocks += 1
            self.held[r] += 1
            if self.held[r] == 1:
                self.num_held_regions += 1
        self.refs[block] += 1

    def _unref(self, block: int) -> None:
        r = self.region_of(block)
        self.refs[block] -= 1
        if self.refs[block]:
            return
        self.num_held_blocks -= 1
        self.held[r] -= 1
        if self.held[r] == 0:
            self.num_held_regions -= 1
        if self.prefix is not None and block in self.prefix.key_of:
            self.region_tick[r] = self.prefix.make_evictable(block)  # cached, most recently used last
            self.cached[r] += 1
        else:
            self._release_block(block)

    def free(self, seq) -> None:
        for block in reversed(seq.block_table):
            self._unref(block)
        seq.block_table = []
        seq.num_registered_blocks = 0
        if seq.slot is not None:
            self._release_slot(seq.slot)
            seq.slot = None
        for region in seq.draft_slots:
            self._release_slot(region)
        seq.draft_slots = []

    # ---------------------------------------------------------------- speculative verification
    def take_draft_slots(self, n: int, reserve_blocks: int = 0) -> list[int]:
        """Up to `n` regions for the GDN states after a verify step's drafts (ForwardBatch.chains), each taken only
        while `reserve_blocks` blocks stay free besides (drafts never cost another sequence its room)."""
        got: list[int] = []
        while len(got) < n and self.num_free_slots >= 1 and \
                self.blocks_per_region + reserve_blocks <= self.num_free_blocks:
            region = self._take_state_region(SLOT)
            if region is None:
                break
            got.append(region)
        return got

    def settle_draft_slots(self, seq, kept: int) -> None:
        """After a verify step that kept `kept` of its rows (the first row and kept - 1 drafts; not yet counted in
        `seq.num_computed_tokens`): the state after the last kept row becomes the sequence's slot; the others
        are free again, but for the state on a snapshot grid point strictly inside the kept run, which
        `cache_computed` files as the sequence's decode snapshot."""
        regions, seq.draft_slots = seq.draft_slots, []
        after_row = [seq.slot, *regions]  # the region holding the state after each row
        start = seq.num_computed_tokens
        for j, region in enumerate(after_row):
            if j == kept - 1:
                continue
            if self.prefix is not None and j < kept - 1 and (start + j + 1) % self.grid == 0:
                seq.grid_state = (start + j + 1, region)
            else:
                self._release_slot(region)
        seq.slot = after_row[kept - 1]

    def _release_slot(self, region: int) -> None:
        self.num_live_slots -= 1
        self._free_region(region)

    # ---------------------------------------------------------------- snapshots inside a chunk
    def plan_snapshots(self, seqs, num_tokens) -> dict[int, list[tuple[int, int, BlockKey]]]:
        """For each scheduled prompt chunk, the grid points strictly inside it that have no snapshot yet, each
        with a region to hold one (free regions first, then the least recently used snapshots'; the deepest
        points first where regions run short): {batch index: [(offset in the chunk, region, key)]}. The model
        writes the states there (ForwardBatch.snapshots); `commit_snapshots` files them after the step."""
        prefix = self.prefix
        if prefix is None:
            return {}
        plans: dict[int, list[tuple[int, int, BlockKey]]] = {}
        for i, (seq, n) in enumerate(zip(seqs, num_tokens, strict=True)):
            start = seq.num_computed_tokens
            if n < 2 or seq.draft_slots:  # a verify step's rows are decodes: their states go to draft slots
                continue
            keys = self._keys(seq)
            points = range((start // prefix.grid + 1) * prefix.grid, start + n, prefix.grid)
            todo = [p for p in reversed(points) if p // self.block_size <= len(keys)
                    and keys[p // self.block_size - 1] not in prefix.snapshots]
            got = []
            for p in todo:
                region = self._take_state_region(SNAPSHOT, evict_blocks=False)
                if region is None:
                    break
                got.append((p - start, region, keys[p // self.block_size - 1]))
            if got:
                plans[i] = sorted(got, key=lambda t: t[0])
        return plans

    def drop_snapshots(self, plans: dict[int, list[tuple[int, int, BlockKey]]]) -> None:
        """Give back the regions of snapshots planned for a step that failed."""
        for plan in plans.values():
            for _, region, _ in plan:
                self._free_region(region)

    def commit_snapshots(self, plans: dict[int, list[tuple[int, int, BlockKey]]]) -> None:
        """File the snapshots the step wrote (after `cache_computed` registered their blocks)."""
        prefix = self.prefix
        for plan in plans.values():
            for _, region, key in plan:
                if key in prefix.snapshots or key not in prefix.block_of:
                    self._free_region(region)  # a duplicate, or its blocks were not kept
                else:
                    prefix.add_snapshot(key, region)

    # ---------------------------------------------------------------- after a step
    def cache_computed(self, seq) -> None:
        """Remember `seq`'s newly full blocks, and snapshot its state if its computed tokens end on the grid (or
        a verify step left the state of a grid point inside its run: `settle_draft_slots`)."""
        prefix = self.prefix
        grid_state, seq.grid_state = seq.grid_state, None
        if prefix is None or seq.slot is None:
            if grid_state is not None:
                self._release_slot(grid_state[1])
            return
        done = seq.num_computed_tokens
        keys = self._keys(seq)
        for b in range(seq.num_registered_blocks, min(done // self.block_size, len(seq.block_table))):
            prefix.register_block(keys[b], seq.block_table[b])
        seq.num_registered_blocks = max(seq.num_registered_blocks, done // self.block_size)
        if grid_state is not None:
            self._decode_snapshot(seq, grid_state[0], grid_state[1])
        if done == 0 or done % prefix.grid:
            return
        self._decode_snapshot(seq, done, None)

    def _decode_snapshot(self, seq, point: int, region: int | None) -> None:
        """Snapshot `seq`'s state at grid point `point`: the one its slot holds (region None: copied into a region),
        or the one already in `region` (a live-slot region, taken over). A sequence keeps only its latest while it
        decodes; a snapshot is kept only with its prefix's blocks."""
        prefix = self.prefix
        key = self._keys(seq)[point // self.block_size - 1]
        if prefix.block_of.get(key) is None or key in prefix.snapshots:
            if key in prefix.snapshots:
                prefix.touch_snapshot(key)
            if region is not None:
                self._release_slot(region)
            return
        decoding = point > seq.num_prompt_tokens
        old = prefix.pop_snapshot(seq.decode_snapshot) if decoding and seq.decode_snapshot is not None else None
        seq.decode_snapshot = key if decoding else None
        if region is not None:  # a verify step's draft slot holds the state already: it becomes the snapshot
            self.num_live_slots -= 1
            if old is not None:
                self._free_region(old)
        else:
            region = old if old is not None else self._take_state_region(SNAPSHOT)
            if region is None:
                return
            self.copy_slot(seq.slot, region)
        self.kind[region] = SNAPSHOT
        prefix.add_snapshot(key, region)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block and snapshot (blocks held by running sequences stay theirs)."""
        prefix = self.prefix
        if prefix is None:
            return
        for block in list(prefix.key_of):
            if self.refs[block] == 0:
                self._forget_cached(block)
            else:
                prefix.forget_block(block)
        while prefix.snapshots:
            self._free_region(prefix.pop_snapshot())

    def all_free(self) -> bool:
        """Every block and region free or held only by the prefix cache (what an idle engine must show)."""
        return self.num_live_slots == 0 and self.num_held_blocks == 0

    def check(self) -> None:
        """Raise AssertionError if the books disagree (tests): each region free, a live slot, a snapshot or KV;
        each KV block free, cached-unheld or held by its reference count; the counters what they count."""
        prefix = self.prefix
        evictable = set(prefix.evictable) if prefix is not None else set()
        snaps = list(prefix.snapshots.values()) if prefix is not None else []
        assert len(set(snaps)) == len(snaps), "a region holds two snapshots"
        assert set(snaps) == {r for r in range(self.num_regions) if self.kind[r] == SNAPSHOT}, \
            "snapshot regions and the snapshot index disagree"
        assert self.free_regions == [r for r in range(self.num_regions) if self.kind[r] == FREE]
        assert set(self.free_in) == {r for r in range(self.num_regions) if self.kind[r] == KV}
        assert self.open_regions == sorted(r for r, free in self.free_in.items() if free)
        assert self.num_live_slots == sum(k == SLOT for k in self.kind)
        nb = self.blocks_per_region
        for r in range(self.num_regions):
            blocks = range(r * nb, (r + 1) * nb)
            if self.kind[r] != KV:
                assert all(self.refs[b] == 0 and b not in evictable for b in blocks), f"region {r} ({self.kind[r]}) " \
                    "has KV blocks in use"
                continue
            free = self.free_in[r]
            assert len(set(free)) == len(free) and set(free) <= set(blocks), f"region {r}'s free list"
            held = sum(self.refs[b] > 0 for b in blocks)
            cached = sum(b in evictable for b in blocks)
            assert (self.held[r], self.cached[r]) == (held, cached), f"region {r}: counts {self.held[r]}, " \
                f"{self.cached[r]} against {held}, {cached}"
            assert held or cached, f"KV region {r} holds nothing but is not free"
            for b in blocks:
                assert self.refs[b] >= 0, f"block {b} has reference count {self.refs[b]}"
                states = (self.refs[b] > 0) + (b in evictable) + (b in free)
                assert states == 1, f"block {b}: held {self.refs[b]}, cached {b in evictable}, free {b in free}"
        assert self.num_held_blocks == sum(r > 0 for r in self.refs)
        assert self.num_held_regions == sum(h > 0 for h in self.held)
        if prefix is not None:
            assert evictable <= set(prefix.key_of), "an evictable block is not cached"
            assert all(prefix.block_of[k] == b for b, k in prefix.key_of.items())
            assert set(prefix.snapshot_ticks) == set(prefix.snapshots)


@dataclass
class CachePlan:
    num_regions: int
    blocks_per_region: int
    block_size: int
    region_bytes: int
    slot_bytes: int
    block_bytes: int
    budget_bytes: int
    max_model_len: int
    extra_attention_layers: int = 0  # KV for layers past the model's own (the MTP layer)

    @property
    def num_blocks(self) -> int:
        """KV blocks the pool holds when it holds nothing else."""
        return self.num_regions * self.blocks_per_region

    @property
    def total_bytes(self) -> int:
        return self.num_regions * self.region_bytes

    def regions_for(self, num_tokens: int) -> int:
        """Regions one sequence of `num_tokens` tokens needs: its slot and its blocks."""
        blocks = -(-num_tokens // self.block_size)
        return 1 + -(-blocks // self.blocks_per_region)


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
               block_size: int = 16, max_position_embeddings: int | None = None,
               extra_attention_layers: int = 0) -> CachePlan:
    """Cut `budget_bytes` into regions (`CacheLayout`): never more than `max_num_seqs` sequences of
    `max_model_len` tokens could use (memory nobody can use is not taken). `max_model_len` None: the longest
    the pool holds next to one state slot, at most `max_position_embeddings`.
    Raises ValueError when one sequence of `max_model_len` tokens does not fit."""
    lay = CacheLayout.of(cfg, dtype, block_size, extra_attention_layers)
    num_regions = budget_bytes // lay.region_bytes

    def plan(n: int, length: int) -> CachePlan:
        return CachePlan(num_regions=int(n), blocks_per_region=lay.blocks_per_region, block_size=block_size,
                         region_bytes=lay.region_bytes, slot_bytes=lay.slot_bytes, block_bytes=lay.block_bytes,
                         budget_bytes=budget_bytes, max_model_len=int(length),
                         extra_attention_layers=extra_attention_layers)

    what = (f"{lay.slot_bytes / 2**20:.2f} MiB of GDN state + {lay.block_bytes / 2**10:.1f} KiB per KV block of "
            f"{block_size} tokens, in regions of {lay.region_bytes / 2**20:.2f} MiB")
    if max_model_len is None:
        limit = max_position_embeddings or cfg.max_position_embeddings
        max_model_len = int(min(limit, (num_regions - 1) * lay.blocks_per_region * block_size))
        if max_model_len < 2:
            raise ValueError(f"the cache budget ({budget_bytes / 2**20:.1f} MiB) cannot hold one sequence: {what}; "
                             f"raise kv_cache_memory_bytes")
    need = plan(0, max_model_len).regions_for(max_model_len)
    if num_regions < need:
        raise ValueError(
            f"the cache budget ({budget_bytes / 2**20:.1f} MiB) cannot hold one sequence of max_model_len="
            f"{max_model_len} tokens ({need * lay.region_bytes / 2**20:.1f} MiB: {what}); lower max_model_len or "
            f"raise kv_cache_memory_bytes")
    return plan(min(num_regions, max_num_seqs * need), max_model_len)


__all__ = ["CacheManager", "CachePlan", "plan_cache", "default_cache_budget", "available_memory_bytes"]
