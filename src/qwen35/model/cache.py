"""The hybrid cache and the description of one varlen forward.

Storage (one pool per kind, shared by all sequences):
  * full-attention layers: paged KV, `k[layer]`/`v[layer]` of shape [num_blocks, Hkv, block_size, D]: a
    block holds each head's keys contiguously, so decode attention streams whole blocks per head;
  * GDN layers: one state slot per sequence, `conv[layer]` [num_slots, C, K-1] (model dtype: it holds
    raw inputs) and `recurrent[layer]` [num_slots, Hv, dk, dv] (always fp32).

A sequence owns one state slot and a list of KV blocks (its block table). The forward never trusts the
contents of a slot for a sequence that starts from position 0: its state is taken as zero, so a slot
reused after another sequence (or after preemption) can never leak stale state.

`ForwardBatch` describes one forward over many sequences at once (varlen): the new tokens of every
sequence are concatenated into one flat run of N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen35.config import TextConfig
from qwen35.ops.hugepages import hugepage_zeros


class CacheFullError(RuntimeError):
    """No free state slot or KV block is left."""


class HybridCache:
    def __init__(self, cfg: TextConfig, num_slots: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 extra_attention_layers: int = 0):
        """`extra_attention_layers`: KV pools beyond the model's own (e.g. one for the MTP layer), indexed
        after the model's attention layers."""
        if num_slots <= 0 or num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"HybridCache needs positive num_slots, num_blocks, block_size; got "
                             f"{num_slots}, {num_blocks}, {block_size}")
        self.cfg = cfg
        self.num_slots, self.num_blocks, self.block_size = num_slots, num_blocks, block_size
        self.dtype, self.device = dtype, torch.device(device)
        K = cfg.linear_conv_kernel_dim
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}
        for i in cfg.linear_layers:
            self.conv[i] = torch.zeros(num_slots, cfg.conv_dim, K - 1, dtype=dtype, device=self.device)
            self.recurrent[i] = hugepage_zeros((num_slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                               cfg.linear_value_head_dim), dtype=torch.float32, device=self.device)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        # Indexed [block, KV head, position in block, dim], stored head-major ([KV head, block, ...], the pools
        # are permuted views): a sequence's blocks, handed out in ascending order, then lie end to end for each
        # head, and decode attention (one thread per head) reads one sequential stream of keys and one of
        # values, which the hardware prefetcher follows (32K decode: 2.0-2.8 against 2.5-3.0 ms per 0.8B layer
        # block-major, paired in one process; a bare read of the same bytes took 1.8-2.3 ms).
        kv_stored = (cfg.num_key_value_heads, num_blocks, block_size, cfg.head_dim)
        kv_layers = list(cfg.attention_layers) + [cfg.num_hidden_layers + j for j in range(extra_attention_layers)]
        for i in kv_layers:
            self.k[i] = hugepage_zeros(kv_stored, dtype=dtype, device=self.device).permute(1, 0, 2, 3)
            self.v[i] = hugepage_zeros(kv_stored, dtype=dtype, device=self.device).permute(1, 0, 2, 3)
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.free_blocks = list(range(num_blocks - 1, -1, -1))

    # ---------------------------------------------------------------- simple allocation
    def new_sequence(self) -> SequenceState:
        if not self.free_slots:
            raise CacheFullError(f"all {self.num_slots} GDN state slots are in use")
        return SequenceState(slot=self.free_slots.pop())

    def reserve(self, seq: SequenceState, total_tokens: int) -> None:
        """Make sure `seq` has KV blocks for `total_tokens` tokens."""
        need = -(-total_tokens // self.block_size) - len(seq.block_table)
        if need > len(self.free_blocks):
            raise CacheFullError(f"need {need} more KV blocks, {len(self.free_blocks)} free")
        for _ in range(max(need, 0)):
            seq.block_table.append(self.free_blocks.pop())

    def release(self, seq: SequenceState) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None
        seq.num_tokens = 0

    def copy_slot(self, src: int, dst: int) -> None:
        """Every GDN layer's conv window and recurrent state of slot `src` into slot `dst` (prefix-cache
        snapshots are taken and restored so)."""
        with torch.no_grad():
            for i in self.conv:
                self.conv[i][dst].copy_(self.conv[i][src])
                self.recurrent[i][dst].copy_(self.recurrent[i][src])

    @staticmethod
    def slot_bytes(cfg: TextConfig, dtype: torch.dtype) -> int:
        """Bytes of one sequence's GDN state over all layers: conv window (model dtype) + fp32 state."""
        conv = cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * torch.finfo(dtype).bits // 8
        state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
        return len(cfg.linear_layers) * (conv + state)

    @staticmethod
    def token_kv_bytes(cfg: TextConfig, dtype: torch.dtype, extra_attention_layers: int = 0) -> int:
        """KV bytes of one token over all full-attention layers."""
        per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
        return (len(cfg.attention_layers) + extra_attention_layers) * per_layer

    @property
    def bytes(self) -> int:
        tensors = [*self.conv.values(), *self.recurrent.values(), *self.k.values(), *self.v.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class SequenceState:
    """What one sequence holds in a `HybridCache`."""

    slot: int | None
    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens whose KV / state are in the cache


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

    @classmethod
    def for_sequences(cls, cache: HybridCache, seqs: list[SequenceState], query_lens: list[int],
                      positions: torch.Tensor | None = None) -> ForwardBatch:
        """Reserve KV room and describe a forward of `query_lens[i]` new tokens for each sequence. Text
        positions continue from each sequence's `num_tokens` unless `positions` is given."""
        for s, n in zip(seqs, query_lens, strict=True):
            if s.slot is None:
                raise ValueError("sequence has been released")
            cache.reserve(s, s.num_tokens + n)
        ctx = [s.num_tokens for s in seqs]
        if positions is None:
            positions = text_positions(ctx, query_lens, cache.device)
        return cls(query_lens=list(query_lens), context_lens=ctx, positions=positions, cache=cache,
                   slots=[s.slot for s in seqs], block_tables=[s.block_table for s in seqs])


@dataclass
class DecodePlan:
    seqs: list[int]  # indices into the batch
    rows: torch.Tensor  # their token rows in the flat batch (long)
    slots: torch.Tensor  # their state slots (long)
    fresh: torch.Tensor  # bool: starting at position 0 (zero state whatever the slot holds)
    kv_blocks: torch.Tensor  # KV pool block of each new token (long)
    kv_offsets: torch.Tensor  # its position inside that block (long)
    block_tables: torch.Tensor  # int32 [n, max_blocks], zero-padded
    context_lens: torch.Tensor  # int32: keys per sequence, the new one included

    @classmethod
    def build(cls, batch: ForwardBatch) -> DecodePlan | None:
        seqs = [i for i, n in enumerate(batch.query_lens) if n == 1]
        if not seqs:
            return None
        bs = batch.cache.block_size
        ctx = [batch.context_lens[i] for i in seqs]
        tables = [batch.block_tables[i] for i in seqs]
        width = max(len(t) for t in tables)
        padded = torch.zeros(len(seqs), width, dtype=torch.int32)
        for j, t in enumerate(tables):
            padded[j, :len(t)] = torch.as_tensor(t, dtype=torch.int32)
        return cls(seqs=seqs, rows=torch.as_tensor([batch.starts[i] for i in seqs], dtype=torch.long),
                   slots=torch.as_tensor([batch.slots[i] for i in seqs], dtype=torch.long),
                   fresh=torch.as_tensor([c == 0 for c in ctx]),
                   kv_blocks=torch.as_tensor([t[c // bs] for t, c in zip(tables, ctx, strict=True)], dtype=torch.long),
                   kv_offsets=torch.as_tensor([c % bs for c in ctx], dtype=torch.long),
                   block_tables=padded, context_lens=torch.as_tensor([c + 1 for c in ctx], dtype=torch.int32))


def text_positions(context_lens: list[int], query_lens: list[int], device=None) -> torch.Tensor:
    """[3, N] positions for text tokens: each sequence continues at its context length."""
    parts = [torch.arange(c, c + n, device=device) for c, n in zip(context_lens, query_lens, strict=True)]
    pos = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
    return pos.unsqueeze(0).expand(3, -1)
