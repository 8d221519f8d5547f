"""Who owns which part of the hybrid cache, and how big the cache is.

The storage (`qwen35.model.HybridCache`) has two pools:
  * KV blocks of `block_size` tokens for the full-attention layers: a sequence holds
    ceil(tokens / block_size) of them (its block table), growing as it generates;
  * GDN state slots (conv window + fp32 recurrent state of every linear-attention layer): one per running
    sequence, whatever its length.
`CacheManager` hands both out and takes them back. It never looks inside them: the model takes a sequence
that starts at position 0 from zero state, so a reused slot or block never leaks what it held before.

Sizing (`plan_cache`): a memory budget is split into slots (at most `max_num_seqs`, at most half the budget)
and blocks (the rest). The plan must hold one sequence of `max_model_len` tokens, else the engine refuses to
start with a message saying what to change; without a `max_model_len` it is what the blocks hold (at most the
model's `max_position_embeddings`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from qwen35.config import TextConfig
from qwen35.model.cache import HybridCache

log = logging.getLogger("qwen35")

#: default share of free memory given to the cache, and the cap on CPU (RAM is shared with everything else)
GPU_MEMORY_FRACTION = 0.9
CPU_MEMORY_FRACTION = 0.25
CPU_CACHE_CAP_BYTES = 4 << 30


class CacheManager:
    """Free lists of KV blocks and state slots; allocation per sequence."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int):
        self.num_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        # Stacks popped from the end: low ids first, which keeps the touched memory compact.
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq, num_tokens: int) -> int:
        """More blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq, num_tokens: int, reserve_blocks: int = 0) -> bool:
        if seq.slot is None and not self.free_slots:
            return False
        return self.blocks_needed(seq, num_tokens) + reserve_blocks <= len(self.free_blocks)

    def allocate(self, seq, num_tokens: int) -> None:
        """Give `seq` a slot (if it has none) and blocks for `num_tokens` tokens."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free_blocks) or (seq.slot is None and not self.free_slots):
            raise RuntimeError("CacheManager.allocate without room: the scheduler must check can_allocate")
        if seq.slot is None:
            seq.slot = self.free_slots.pop()
        for _ in range(need):
            seq.block_table.append(self.free_blocks.pop())

    def free(self, seq) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    def all_free(self) -> bool:
        return len(self.free_blocks) == self.num_blocks and len(self.free_slots) == self.num_slots


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
