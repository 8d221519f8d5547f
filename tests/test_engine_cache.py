"""Cache sizing and the block / slot allocator."""

from __future__ import annotations

import pytest
import torch

from qwen35.config import find_preset
from qwen35.engine.cache_manager import CacheManager, available_memory_bytes, default_cache_budget, plan_cache
from qwen35.model.cache import HybridCache

CFG = find_preset("Qwen3.5-0.8B").text
SLOT = HybridCache.slot_bytes(CFG, torch.bfloat16)
BLOCK = HybridCache.token_kv_bytes(CFG, torch.bfloat16) * 16


def test_plan_splits_the_budget():
    budget = 4 << 30
    plan = plan_cache(CFG, torch.bfloat16, budget, max_num_seqs=256, max_model_len=32768)
    assert plan.slot_bytes == SLOT and plan.block_bytes == BLOCK == 12288 * 16  # FACTS.md: 12,288 B per token
    assert plan.num_slots * SLOT <= budget // 2 and plan.num_slots <= 256
    assert plan.total_bytes <= budget and plan.max_model_len == 32768
    assert plan.num_blocks * BLOCK >= budget - plan.num_slots * SLOT - BLOCK  # the rest went to KV
    few = plan_cache(CFG, torch.bfloat16, budget, max_num_seqs=2, max_model_len=1024)
    assert few.num_slots == 2 and few.num_blocks == 2 * 64  # no more KV than 2 sequences of 1024 can use


def test_plan_without_max_model_len_follows_the_budget():
    plan = plan_cache(CFG, torch.bfloat16, 1 << 30, max_num_seqs=8, max_model_len=None)
    assert plan.num_slots == 8 and plan.max_model_len == plan.num_blocks * 16
    capped = plan_cache(CFG, torch.bfloat16, 1 << 34, max_num_seqs=1, max_model_len=None)
    assert capped.max_model_len == CFG.max_position_embeddings


def test_plan_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="max_model_len=262144.*kv_cache_memory_bytes"):
        plan_cache(CFG, torch.bfloat16, 1 << 30, max_num_seqs=4, max_model_len=262144)
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        plan_cache(CFG, torch.bfloat16, SLOT // 2, max_num_seqs=4, max_model_len=None)


def test_default_budget_is_sane():
    assert available_memory_bytes(torch.device("cpu")) > 0
    assert 0 < default_cache_budget(torch.device("cpu")) <= 4 << 30


class _Seq:
    def __init__(self):
        self.slot, self.block_table = None, []


def test_allocator():
    cm = CacheManager(num_blocks=10, block_size=4, num_slots=2)
    a, b, c = _Seq(), _Seq(), _Seq()
    assert cm.can_allocate(a, 13)
    cm.allocate(a, 13)  # 4 blocks
    assert a.slot is not None and len(a.block_table) == 4 and cm.num_free_blocks == 6
    cm.allocate(a, 16)  # still 4
    assert len(a.block_table) == 4
    cm.allocate(b, 24)
    assert not cm.can_allocate(c, 1)  # no slot left
    assert not cm.can_allocate(a, 17)  # no block left
    with pytest.raises(RuntimeError):
        cm.allocate(c, 1)
    cm.free(a)
    assert a.slot is None and a.block_table == [] and cm.can_allocate(c, 16)
    cm.free(b)
    assert cm.all_free()
