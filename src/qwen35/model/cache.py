"""The hybrid cache's storage and the description of one varlen forward.

Storage: one buffer of `num_regions` equal regions (`CacheLayout`), each, at any moment, either
  * a GDN state slot: every linear-attention layer's fp32 recurrent state [Hv, dk, dv] and conv window
    [C, K-1] (model dtype: it holds raw inputs) of one sequence, or of one prefix-cache snapshot; or
  * `blocks_per_region` KV blocks of `block_size` tokens for every full-attention layer, head-major inside the
    region: each KV head's keys of the region's blocks lie end to end, so decode attention (one thread per
    head) reads one sequential stream of keys and one of values across a sequence's consecutive blocks, which
    the hardware prefetcher follows (32K decode: 2.0-2.8 against 2.5-3.0 ms per 0.8B layer block-major,
    paired in one process; a bare read of the same bytes took 1.8-2.3 ms).
The per-layer views overlay every region: `recurrent[layer]` [num_regions, Hv, dk, dv] and `conv[layer]`
[num_regions, C, K-1] index regions as slots, `k[layer]` / `v[layer]` [num_regions, Hkv, blocks_per_region,
block_size, D] hold block b in region b // blocks_per_region (`kv_index`). Which region is what is decided by
the engine's allocator (`qwen35.engine.cache_manager.CacheManager`) alone: this class only stores.
The forward never trusts the contents of a slot for a sequence that starts from position 0: its state is
taken as zero, so a region that held KV blocks or another sequence's state never leaks into a new one.

`ForwardBatch` describes one forward over many sequences at once (varlen): the new tokens of every
sequence are concatenated into one flat run of N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen35.config import TextConfig
from qwen35.ops.hugepages import hugepage_zeros

REGION_ALIGN = 64  # bytes: every region starts on a cache line


@dataclass(frozen=True)
class CacheLayout:
    """Where everything lies in one region; the same arithmetic sizes the engine's plan and the storage."""

    block_size: int
    blocks_per_region: int
    region_bytes: int
    slot_bytes: int  # one GDN state (every linear-attention layer)
    block_bytes: int  # one KV block (every full-attention layer, keys and values)
    num_attention_layers: int  # the model's own full-attention layers + extra ones (MTP)

    @classmethod
    def of(cls, cfg: TextConfig, dtype: torch.dtype, block_size: int = 16,
           extra_attention_layers: int = 0) -> CacheLayout:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        esz = torch.finfo(dtype).bits // 8
        conv = cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * esz
        state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
        slot_bytes = len(cfg.linear_layers) * (state + conv)
        n_attn = len(cfg.attention_layers) + extra_attention_layers
        block_bytes = n_attn * 2 * cfg.num_key_value_heads * block_size * cfg.head_dim * esz
        per_region = max(1, -(-slot_bytes // block_bytes)) if block_bytes else 1
        region = max(slot_bytes, per_region * block_bytes, 1)
        region = -(-region // REGION_ALIGN) * REGION_ALIGN
        return cls(block_size=block_size, blocks_per_region=per_region, region_bytes=region, slot_bytes=slot_bytes,
                   block_bytes=block_bytes, num_attention_layers=n_attn)


class HybridCache:
    def __init__(self, cfg: TextConfig, num_regions: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", extra_attention_layers: int = 0):
        """`extra_attention_layers`: KV beyond the model's own layers (e.g. one for the MTP layer), indexed
        after the model's attention layers."""
        if num_regions <= 0:
            raise ValueError(f"HybridCache needs a positive num_regions, got {num_regions}")
        self.cfg = cfg
        self.layout = lay = CacheLayout.of(cfg, dtype, block_size, extra_attention_layers)
        self.num_regions, self.block_size = num_regions, block_size
        self.blocks_per_region = lay.blocks_per_region
        self.dtype, self.device = dtype, torch.device(device)
        self.buffer = hugepage_zeros((num_regions * lay.region_bytes,), dtype=torch.uint8, device=self.device)
        f32, typed = self.buffer.view(torch.float32), self.buffer.view(dtype)
        esz = typed.element_size()
        K = cfg.linear_conv_kernel_dim
        Hv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        state_elems, conv_elems = Hv * dk * dv, cfg.conv_dim * (K - 1)
        gdn = list(cfg.linear_layers)
        self.recurrent: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        for j, i in enumerate(gdn):
            self.recurrent[i] = f32.as_strided((num_regions, Hv, dk, dv), (lay.region_bytes // 4, dk * dv, dv, 1),
                                               j * state_elems)
            conv_at = (len(gdn) * state_elems * 4) // esz + j * conv_elems
            self.conv[i] = typed.as_strided((num_regions, cfg.conv_dim, K - 1), (lay.region_bytes // esz, K - 1, 1),
                                            conv_at)
        Hkv, D, nb, bs = cfg.num_key_value_heads, cfg.head_dim, lay.blocks_per_region, block_size
        layer_elems = Hkv * nb * bs * D
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        kv_layers = list(cfg.attention_layers) + [cfg.num_hidden_layers + j for j in range(extra_attention_layers)]
        for j, i in enumerate(kv_layers):
            shape, strides = (num_regions, Hkv, nb, bs, D), (lay.region_bytes // esz, nb * bs * D, bs * D, D, 1)
            self.k[i] = typed.as_strided(shape, strides, 2 * j * layer_elems)
            self.v[i] = typed.as_strided(shape, strides, (2 * j + 1) * layer_elems)

    @property
    def num_blocks(self) -> int:
        return self.num_regions * self.blocks_per_region

    def kv_index(self, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple:
        """`k[layer][index]` is then the [n, Hkv, D] keys of positions `offsets` in blocks `blocks` (long)."""
        nb = self.blocks_per_region
        return blocks // nb, slice(None), blocks % nb, offsets

    def copy_slot(self, src: int, dst: int) -> None:
        """The GDN state (every layer's conv window and recurrent state) of region `src` into region `dst`
        (prefix-cache snapshots are taken and restored so)."""
        rb, n = self.layout.region_bytes, self.layout.slot_bytes
        with torch.no_grad():
            self.buffer[dst * rb:dst * rb + n].copy_(self.buffer[src * rb:src * rb + n])

    @property
    def bytes(self) -> int:
        return self.buffer.numel()


@dataclass
class ForwardBatch:
    """One varlen forward: sequence i contributes `query_lens[i]` new tokens after `context_lens[i]`
    tokens already in the cache. `positions` [3, N] are the M-RoPE (T, H, W) positions of the N new
    tokens. With `cache=None` every sequence starts from empty state and nothing is stored."""

    query_lens: list[int]
    context_lens: list[int]
    positions: torch.Tensor
    cache: HybridCache | None = None
    slots: list[int] | None = None
    block_tables: list[list[int]] | None = None
    # prefix-cache snapshots: {sequence index: [(offset o in its new tokens, slot)]}: every GDN layer writes its
    # state after the first o new tokens (conv window and recurrent state) into that slot of the cache
    snapshots: dict[int, list[tuple[int, int]]] | None = None
    # speculative verification: {sequence index: [slot for the state after new token 1, after 2, ...]}: its n new
    # tokens run as n chained decodes (each one a decode over the cache and the ones before it, computed exactly as
    # a decode step would), the GDN state after token 0 in its own slot and after token j in chains[i][j - 1]
    chains: dict[int, list[int]] | None = None
    starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.context_lens):
            raise ValueError("query_lens and context_lens must have one entry per sequence")
        if self.cache is not None and (self.slots is None or self.block_tables is None):
            raise ValueError("a ForwardBatch over a cache needs slots and block_tables")
        if self.cache is None and any(c != 0 for c in self.context_lens):
            raise ValueError("context_lens must be 0 without a cache")
        for i, cuts in (self.snapshots or {}).items():
            if self.cache is None or not all(0 < o < self.query_lens[i] for o, _ in cuts) or \
                    [o for o, _ in cuts] != sorted({o for o, _ in cuts}):
                raise ValueError(f"snapshots of sequence {i}: offsets must rise strictly inside its "
                                 f"{self.query_lens[i]} new tokens, over a cache")
        for i, regions in (self.chains or {}).items():
            if self.cache is None or len(regions) != self.query_lens[i] - 1 or i in (self.snapshots or {}):
                raise ValueError(f"chains of sequence {i}: one slot per new token after the first, over a cache, "
                                 f"without snapshots")
        self.starts = [0]
        for n in self.query_lens:
            self.starts.append(self.starts[-1] + n)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def decode(self) -> DecodePlan | None:
        """The sequences bringing exactly one token over the cache (decodes), with the index tensors every
        layer needs for them, built once per forward rather than once per layer."""
        if not hasattr(self, "_decode"):
            self._decode = DecodePlan.build(self) if self.cache is not None else None
        return self._decode

    @property
    def num_tokens(self) -> int:
        return self.starts[-1]


@dataclass
class DecodePlan:
    """The decode rows of a forward: every one-token sequence, and every token of a chained sequence
    (`ForwardBatch.chains`), each a decode over the cache. A chain's row j reads the GDN state its row j - 1
    wrote (`src_slots`) and writes its own (`slots`); rows run in rounds by `chain_pos` (round 0 holds every
    plain decode and each chain's first row, in place in its slot)."""

    seqs: list[int]  # indices into the batch
    rows: torch.Tensor  # their token rows in the flat batch (long)
    slots: torch.Tensor  # the state slot each row writes (long)
    fresh: torch.Tensor  # bool: starting at position 0 (zero state whatever the slot holds)
    kv_index: tuple  # where each new token's key goes: `cache.k[layer][kv_index]` (HybridCache.kv_index)
    block_tables: torch.Tensor  # int32 [n, max_blocks], zero-padded
    context_lens: torch.Tensor  # int32: keys per row, its own included
    src_slots: torch.Tensor | None = None  # the slot each row reads (None: its own, in place: no chains)
    rounds: list[torch.Tensor] | None = None  # positions in `rows` of each round (None: one round of all)

    @classmethod
    def build(cls, batch: ForwardBatch) -> DecodePlan | None:
        chains = batch.chains or {}
        seqs = [i for i, n in enumerate(batch.query_lens) if n == 1 or i in chains]
        if not seqs:
            return None
        bs = batch.cache.block_size
        rows, ctx, tables, slots, src, pos = [], [], [], [], [], []
        for i in seqs:
            own = batch.slots[i]
            for j in range(batch.query_lens[i]):
                rows.append(batch.starts[i] + j)
                ctx.append(batch.context_lens[i] + j)
                tables.append(batch.block_tables[i])
                slots.append(own if j == 0 else chains[i][j - 1])
                src.append(own if j == 0 else slots[-2])
                pos.append(j)
        width = max(len(t) for t in tables)
        padded = torch.zeros(len(rows), width, dtype=torch.int32)
        for j, t in enumerate(tables):
            padded[j, :len(t)] = torch.as_tensor(t, dtype=torch.int32)
        rounds = None
        if chains:
            chain_pos = torch.as_tensor(pos)
            rounds = [(chain_pos == r).nonzero().flatten() for r in range(int(chain_pos.max()) + 1)]
        return cls(seqs=seqs, rows=torch.as_tensor(rows, dtype=torch.long),
                   slots=torch.as_tensor(slots, dtype=torch.long),
                   fresh=torch.as_tensor([c == 0 for c in ctx]),
                   kv_index=batch.cache.kv_index(
                       torch.as_tensor([t[c // bs] for t, c in zip(tables, ctx, strict=True)], dtype=torch.long),
                       torch.as_tensor([c % bs for c in ctx], dtype=torch.long)),
                   block_tables=padded, context_lens=torch.as_tensor([c + 1 for c in ctx], dtype=torch.int32),
                   src_slots=torch.as_tensor(src, dtype=torch.long) if chains else None, rounds=rounds)


def text_positions(context_lens: list[int], query_lens: list[int], device=None) -> torch.Tensor:
    """[3, N] positions for text tokens: each sequence continues at its context length."""
    parts = [torch.arange(c, c + n, device=device) for c, n in zip(context_lens, query_lens, strict=True)]
    pos = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
    return pos.unsqueeze(0).expand(3, -1)
