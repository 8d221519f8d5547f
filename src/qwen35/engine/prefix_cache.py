"""What the prefix cache remembers: full KV blocks by the token prefix they end, GDN state snapshots by the
prefix they follow.

A KV block is known by a chain key: the key of the block before it and its own `block_size` token ids, so
equal keys mean equal prefixes (the token tuples are compared on every hit, never only the hash). A GDN layer's
state after token p depends on every token before p, so it cannot be rebuilt from blocks: a *snapshot* (the conv
window and fp32 state of every GDN layer, stored in a state slot like a live sequence's) is kept at points of
an absolute grid of `grid` tokens, under the key of the block that ends there. A request resumes from the
longest prefix that has both its blocks and a snapshot.

This module only keeps the indexes (which block or slot holds what, least recently used first, with the tick
of its last use so that blocks and snapshots can be weighed against each other in one pool); the cache manager
(`engine/cache_manager.py`) hands the blocks and slots out and back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

#: snapshots sit every this many tokens (absolute positions); prompts are prefilled in chunks that end on it
SNAPSHOT_GRID = 64


@dataclass(frozen=True)
class BlockKey:
    """A full KV block's place in a token sequence: the chain key before it and its own tokens."""

    parent: int
    tokens: tuple[int, ...]

    @property
    def chain(self) -> int:
        return hash((self.parent, self.tokens))


def chain_keys(token_ids: Sequence[int], block_size: int, start: list[BlockKey]) -> list[BlockKey]:
    """`start` (the keys of the first blocks, already known) extended to every full block of `token_ids`."""
    keys = list(start)
    parent = keys[-1].chain if keys else 0
    for b in range(len(keys), len(token_ids) // block_size):
        key = BlockKey(parent, tuple(token_ids[b * block_size:(b + 1) * block_size]))
        keys.append(key)
        parent = key.chain
    return keys


@dataclass
class PrefixHit:
    """A cached prefix of `num_tokens` tokens: its KV blocks (in order) and the snapshot slot after it."""

    num_tokens: int
    blocks: list[int]
    snapshot: BlockKey


class PrefixIndex:
    """Cached blocks (key -> block, unreferenced ones in LRU order) and snapshots (key -> slot, LRU order)."""

    def __init__(self, block_size: int, grid: int = SNAPSHOT_GRID):
        if grid % block_size:
            raise ValueError(f"the snapshot grid ({grid} tokens) must be a multiple of block_size ({block_size})")
        self.block_size, self.grid = block_size, grid
        self.block_of: dict[BlockKey, int] = {}
        self.key_of: dict[int, BlockKey] = {}
        self.evictable: OrderedDict[int, int] = OrderedDict()  # cached blocks no sequence holds -> tick, oldest first
        self.snapshots: OrderedDict[BlockKey, int] = OrderedDict()  # key -> slot, oldest first
        self.snapshot_ticks: dict[BlockKey, int] = {}
        self.clock = 0  # ticks once per use: orders blocks and snapshots alike
        self.queried_tokens = 0
        self.hit_tokens = 0

    # ---------------------------------------------------------------- lookups
    def longest_hit(self, keys: list[BlockKey], limit: int) -> PrefixHit | None:
        """The longest prefix of at most `limit` tokens, on the grid, whose blocks and snapshot are cached."""
        per_grid = self.grid // self.block_size
        best: PrefixHit | None = None
        blocks: list[int] = []
        for b, key in enumerate(keys):
            if (b + 1) * self.block_size > limit:
                break
            block = self.block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            if (b + 1) % per_grid == 0 and key in self.snapshots:
                best = PrefixHit((b + 1) * self.block_size, list(blocks), key)
        return best

    # ---------------------------------------------------------------- blocks
    def register_block(self, key: BlockKey, block: int) -> bool:
        """Remember that `block` holds `key`'s tokens (False: another block already does; this one stays
        anonymous)."""
        if key in self.block_of or block in self.key_of:
            return False
        self.block_of[key] = block
        self.key_of[block] = key
        return True

    def forget_block(self, block: int) -> None:
        key = self.key_of.pop(block)
        del self.block_of[key]
        self.evictable.pop(block, None)

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def make_evictable(self, block: int) -> int:
        """A cached block nobody holds any more (most recently used); returns its tick."""
        t = self.evictable[block] = self.tick()
        return t

    def oldest_evictable(self) -> tuple[int, int] | None:
        """(block, tick) of the least recently used cached block nobody holds."""
        return next(iter(self.evictable.items()), None)

    def oldest_snapshot(self) -> tuple[BlockKey, int] | None:
        """(key, tick) of the least recently used snapshot."""
        key = next(iter(self.snapshots), None)
        return None if key is None else (key, self.snapshot_ticks[key])

    # ---------------------------------------------------------------- snapshots
    def add_snapshot(self, key: BlockKey, slot: int) -> None:
        self.snapshots[key] = slot
        self.snapshot_ticks[key] = self.tick()

    def touch_snapshot(self, key: BlockKey) -> None:
        self.snapshots.move_to_end(key)
        self.snapshot_ticks[key] = self.tick()

    def pop_snapshot(self, key: BlockKey | None = None) -> int | None:
        """Drop `key`'s snapshot (default: the least recently used one) and return its slot."""
        if key is None:
            if not self.snapshots:
                return None
            key = next(iter(self.snapshots))
        self.snapshot_ticks.pop(key, None)
        return self.snapshots.pop(key, None)


__all__ = ["SNAPSHOT_GRID", "BlockKey", "PrefixHit", "PrefixIndex", "chain_keys"]
