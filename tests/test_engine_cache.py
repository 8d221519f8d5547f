"""Cache sizing and the block / slot allocator."""

from __future__ import annotations

import pytest
import torch

from qwen35.config import find_preset
from qwen35.engine.cache_manager import CacheManager, available_memory_bytes, default_cache_budget, plan_cache
from qwen35.model.cache import CacheLayout

CFG = find_preset("Qwen3.5-0.8B").text
LAYOUT = CacheLayout.of(CFG, torch.bfloat16)
SLOT = LAYOUT.slot_bytes


def test_plan_cuts_the_budget_into_regions():
    budget = 4 << 30
    plan = plan_cache(CFG, torch.bfloat16, budget, max_num_seqs=256, max_model_len=32768)
    assert plan.block_bytes == 12288 * 16  # FACTS.md: 12,288 B of KV per token
    # 18 GDN layers x (16 x 128 x 128 fp32 state + 6144 x 3 bf16 conv window)
    assert plan.slot_bytes == 18 * (16 * 128 * 128 * 4 + 6144 * 3 * 2)
    # a region holds one state or the KV blocks of the same memory (100 blocks: 1600 tokens)
    assert plan.blocks_per_region == 100 and plan.region_bytes == 100 * plan.block_bytes >= plan.slot_bytes
    assert plan.num_regions == budget // plan.region_bytes and plan.total_bytes <= budget
    assert plan.max_model_len == 32768
    few = plan_cache(CFG, torch.bfloat16, budget, max_num_seqs=2, max_model_len=1024)
    assert few.num_regions == 2 * 2  # no more than 2 sequences of 1024 tokens can use: a slot and a region of KV


def test_plan_without_max_model_len_follows_the_budget():
    plan = plan_cache(CFG, torch.bfloat16, 1 << 30, max_num_seqs=8, max_model_len=None)
    # one sequence may take all the KV the pool holds next to its own state
    assert plan.max_model_len == (plan.num_regions - 1) * plan.blocks_per_region * 16
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
        self.slot, self.block_table, self.draft_slots = None, [], []


def test_allocator_shares_regions_between_states_and_blocks():
    cm = CacheManager(num_regions=4, blocks_per_region=3, block_size=4)
    a, b, c = _Seq(), _Seq(), _Seq()
    assert cm.can_allocate(a, 13)
    cm.allocate(a, 13)  # 4 blocks: regions 0 and 1; its state: region 3 (slots from the top)
    assert a.slot == 3 and a.block_table == [0, 1, 2, 3] and cm.kind == ["kv", "kv", "free", "slot"]
    assert cm.num_free_blocks == 3 * 3 - 4 and cm.num_free_slots == 1
    cm.allocate(a, 16)  # still 4
    assert len(a.block_table) == 4
    cm.allocate(b, 8)  # the last whole region for its state, the rest of region 1 for its blocks
    assert b.slot == 2 and b.block_table == [4, 5] and cm.num_free_blocks == 0
    assert not cm.can_allocate(c, 1)  # no region left for a state
    assert not cm.can_allocate(a, 17)  # no block left
    with pytest.raises(RuntimeError):
        cm.allocate(c, 1)
    cm.check()
    cm.free(a)  # region 0 and its state's region are free again; region 1 keeps b's blocks
    assert a.slot is None and a.block_table == [] and cm.kind == ["free", "kv", "slot", "free"]
    # two whole regions (0, 3) and a free block in region 1: a state and 4 blocks
    assert cm.can_allocate(c, 16) and not cm.can_allocate(c, 17)
    cm.allocate(c, 16)
    assert c.slot == 3 and c.block_table == [3, 0, 1, 2]
    cm.check()
    cm.free(b)
    cm.free(c)
    cm.check()
    assert cm.all_free() and cm.kind == ["free"] * 4
