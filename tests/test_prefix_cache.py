"""Prefix caching: requests that begin alike start from cached KV blocks and GDN state snapshots, and get the
tokens (and logprobs) they get without the cache."""

from __future__ import annotations

import random

import pytest
import torch
from test_engine_support import engine_llm, make_model, random_prompts, write_config

from qwen35 import SamplingParams
from qwen35.engine.prefix_cache import SNAPSHOT_GRID, chain_keys
from qwen35.model.cache import CacheLayout

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(write_config(tmp_path_factory.mktemp("tiny") / "m"))


def _run(llm, prompts, params=GREEDY, together=False):
    if together:
        return llm.generate(prompts, params, use_tqdm=False)
    return [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        lg = [next(iter(d.values())).logprob for d in g.outputs[0].logprobs]
        lw = [next(iter(d.values())).logprob for d in w.outputs[0].logprobs]
        assert max(abs(a - b) for a, b in zip(lg, lw, strict=True)) < 1e-5


def _prompts():
    base = random_prompts([3100], seed=11)[0]
    tails = random_prompts([40, 77, 1, 5, 64], seed=12)
    lengths = [127, 128, 129]
    return ([base[:n] for n in lengths]  # 64k-1, 64k, 64k+1, each a prefix of the next
            + [base[:100] + tails[0], base[:100] + tails[1], base[:100] + tails[0]]  # A, B, A over 100 shared
            + [base[:3000] + tails[2], base[:3000] + tails[3], base[:3000] + tails[4]])  # 3000 shared


@pytest.mark.parametrize("together", [False, True])
def test_cache_on_gives_what_cache_off_gives(model, together):
    prompts = _prompts()
    on = engine_llm(model, kv_cache_memory_bytes=1 << 26, max_num_batched_tokens=1024)
    off = engine_llm(model, kv_cache_memory_bytes=1 << 26, max_num_batched_tokens=1024, enable_prefix_caching=False)
    _assert_same(_run(on, prompts, together=together), _run(off, prompts, together=together))
    _assert_same(_run(on, prompts, together=together), _run(off, prompts, together=together))  # all cached now
    assert on.engine.prefix_cache_stats()["hit_tokens"] > 0
    on.engine.cache.check()
    assert on.engine.cache.all_free() and off.engine.cache.all_free()


@pytest.mark.parametrize("shared", [64, 65, 100, 130, 1000])
def test_a_shared_prefix_hits_on_the_grid(model, shared):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 26, max_num_batched_tokens=512)
    base = random_prompts([shared], seed=shared)[0]
    a, b = random_prompts([30, 50], seed=shared + 1)
    first = llm.generate([base + a], GREEDY, use_tqdm=False)[0]
    second = llm.generate([base + b], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert SNAPSHOT_GRID * ((shared - 1) // SNAPSHOT_GRID) <= second.num_cached_tokens <= shared
    again = llm.generate([base + a], GREEDY, use_tqdm=False)[0]  # all but the last token's grid point
    assert again.num_cached_tokens == SNAPSHOT_GRID * ((len(base + a) - 1) // SNAPSHOT_GRID)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_a_restored_snapshot_is_the_uncached_state_bit_for_bit(model):
    prompt = random_prompts([200], seed=5)[0]
    once = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    on = engine_llm(model, kv_cache_memory_bytes=1 << 26, max_num_batched_tokens=4096)
    on.generate([prompt], once, use_tqdm=False)
    prefix = on.engine.cache.prefix
    keys = chain_keys(prompt, 16, [])
    for p in (64, 128, 192):  # snapshots inside the one 200-token chunk
        snap = prefix.snapshots[keys[p // 16 - 1]]
        off = engine_llm(model, kv_cache_memory_bytes=1 << 26, max_num_batched_tokens=4096,
                         enable_prefix_caching=False)
        off.generate([prompt[:p]], once, use_tqdm=False)  # its one sequence had the top region; its state stays
        a, b = on.engine.runner.cache, off.engine.runner.cache
        top = off.engine.cache.num_regions - 1
        for layer in a.recurrent:
            assert torch.equal(a.recurrent[layer][snap], b.recurrent[layer][top]), (p, layer)
            assert torch.equal(a.conv[layer][snap], b.conv[layer][top]), (p, layer)


def test_eviction_under_memory_pressure(model):
    cfg = model.config.text
    budget = 88 * CacheLayout.of(cfg, torch.float32).region_bytes  # a few prompts' blocks and snapshots, not all
    rng = random.Random(3)
    bases = random_prompts([400, 300, 500], seed=21)
    prompts = [bases[rng.randrange(3)][:rng.randrange(60, 300)] + random_prompts([rng.randrange(1, 60)],
                                                                                 seed=100 + i)[0]
               for i in range(24)]
    on = engine_llm(model, kv_cache_memory_bytes=budget, max_num_seqs=8, max_model_len=640)
    off = engine_llm(model, kv_cache_memory_bytes=budget, max_num_seqs=8, max_model_len=640,
                     enable_prefix_caching=False)
    _assert_same(_run(on, prompts), _run(off, prompts))
    stats = on.engine.prefix_cache_stats()
    assert 0 < stats["hit_tokens"] < stats["queried_tokens"]
    on.engine.cache.check()
    assert on.engine.cache.all_free()


def test_many_requests_with_aborts_leave_consistent_books(model):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 23, max_num_seqs=8, max_num_batched_tokens=256,
                     max_model_len=512)
    eng = llm.engine
    rng = random.Random(0)
    bases = random_prompts([300, 200, 250, 100], seed=31)
    live: list[str] = []
    for i in range(1000):
        base = bases[rng.randrange(len(bases))]
        prompt = base[:rng.randrange(0, len(base))] + [rng.randrange(512) for _ in range(rng.randrange(1, 40))]
        live.append(eng.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=rng.randrange(1, 6),
                                                                 ignore_eos=True)))
        if rng.random() < 0.15:
            eng.abort_request(live.pop(rng.randrange(len(live))))
        if i % 4 == 0:
            eng.step()
            eng.cache.check()
    while eng.has_unfinished_requests():
        eng.step()
    eng.cache.check()
    assert eng.cache.all_free()
    assert eng.prefix_cache_stats()["hit_tokens"] > 0
    assert all(r == 0 for r in eng.cache.refs)


def test_reset_and_off(model):
    prompt = random_prompts([150], seed=9)[0]
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 26)
    llm.generate([prompt], GREEDY, use_tqdm=False)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 128
    assert llm.reset_prefix_cache() is True
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    off = engine_llm(model, kv_cache_memory_bytes=1 << 26, enable_prefix_caching=False)
    off.generate([prompt], GREEDY, use_tqdm=False)
    assert off.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    assert off.reset_prefix_cache() is False
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        engine_llm(model, kv_cache_memory_bytes=1 << 26, enable_prefix_caching="yes")
    with pytest.raises(ValueError, match="block_size=24"):
        engine_llm(model, kv_cache_memory_bytes=1 << 26, block_size=24)


def test_a_chat_hits_from_turn_two(model):
    """Each turn's prompt is the previous prompt, its answer and a new message: the cache reaches the grid
    point before the end of what was computed last turn."""
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 26, max_num_batched_tokens=512)
    off = engine_llm(model, kv_cache_memory_bytes=1 << 26, max_num_batched_tokens=512, enable_prefix_caching=False)
    history = random_prompts([700], seed=41)[0]
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, logprobs=0)
    for turn in range(3):
        out = llm.generate([history], params, use_tqdm=False)[0]
        _assert_same([out], off.generate([history], params, use_tqdm=False))
        if turn:
            assert out.num_cached_tokens >= SNAPSHOT_GRID * ((len(history) - 40 - 1) // SNAPSHOT_GRID) - SNAPSHOT_GRID
        history = history + out.outputs[0].token_ids + random_prompts([40], seed=50 + turn)[0]


def test_a_failed_step_gives_its_snapshot_slots_back(model, monkeypatch):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 26, max_num_batched_tokens=512)
    eng = llm.engine
    real = eng.runner.run

    def boom(work, plan):
        assert work.snapshots  # a 300-token prompt plans snapshots at 64 ... 256
        raise RuntimeError("injected")

    monkeypatch.setattr(eng.runner, "run", boom)
    rid = eng.add_request(None, random_prompts([300], seed=77)[0], GREEDY)
    with pytest.raises(RuntimeError, match="injected"):
        eng.step()
    eng.abort_request(rid)
    eng.step()
    monkeypatch.setattr(eng.runner, "run", real)
    eng.cache.check()
    assert eng.cache.all_free() and eng.cache.free_regions == list(range(eng.cache.num_regions))


def _fake_sequence(ids, seed):
    from qwen35.engine.sequence import bare_sequence

    return bare_sequence(ids, seed)


def test_one_pool_evicts_the_least_recently_used_of_blocks_and_snapshots():
    """Blocks and snapshots compete for the same regions, oldest out first, whatever it is."""
    from qwen35.engine.cache_manager import CacheManager

    copies = []
    cm = CacheManager(num_regions=6, blocks_per_region=4, block_size=16, enable_prefix_caching=True,
                      copy_slot=lambda src, dst: copies.append((src, dst)))
    a = _fake_sequence(random_prompts([128], seed=1)[0], 1)
    cm.allocate(a, 128)  # its state in region 5, its 8 blocks in regions 0 and 1
    assert a.slot == 5 and cm.kind == ["kv", "kv", "free", "free", "free", "slot"]
    a.num_computed_tokens = 128
    cm.cache_computed(a)  # its blocks remembered, its state at 128 snapshotted into region 4
    assert copies == [(5, 4)] and cm.kind[4] == "snapshot" and len(cm.prefix.key_of) == 8
    cm.free(a)  # its blocks stay cached (let go after the snapshot was taken: more recently used)
    cm.check()
    assert cm.all_free() and cm.num_free_blocks == 24 and cm.num_free_slots == 6  # what is cached can go
    b = _fake_sequence(random_prompts([256], seed=2)[0], 2)
    assert cm.lookup(b) is None and cm.can_allocate(b, 256)
    cm.allocate(b, 256)  # 16 blocks and a state: the free regions, then the snapshot, then the oldest 4 blocks
    cm.check()
    # a's table was let go from its end: its first 4 blocks are the most recent and stay
    assert not cm.prefix.snapshots and set(cm.prefix.key_of) == set(cm.prefix.evictable) == {0, 1, 2, 3}
    assert not cm.can_allocate(_fake_sequence([1] * 100, 3), 100)  # 4 unheld blocks: no room for a state
    cm.free(b)
    cm.check()


def test_a_snapshot_may_evict_cached_blocks_older_than_itself():
    from qwen35.engine.cache_manager import CacheManager

    cm = CacheManager(num_regions=3, blocks_per_region=4, block_size=16, enable_prefix_caching=True,
                      copy_slot=lambda src, dst: None)
    a = _fake_sequence(random_prompts([64], seed=4)[0], 1)
    cm.allocate(a, 64)  # state in region 2, blocks in region 0
    a.num_computed_tokens = 64
    cm.cache_computed(a)  # snapshot at 64 in region 1 (the last free one)
    cm.free(a)
    b = _fake_sequence(random_prompts([64], seed=5)[0], 2)
    cm.allocate(b, 64)  # state: region 2 again; blocks: region 0 holds a's cached blocks, newer than the
    cm.check()          # snapshot: the snapshot's region goes
    assert b.slot == 2 and not cm.prefix.snapshots and {cm.region_of(x) for x in b.block_table} == {1}
    b.num_computed_tokens = 64
    cm.cache_computed(b)  # no free region: a's idle KV region (older than anything else) makes room
    cm.check()
    assert len(cm.prefix.snapshots) == 1 and cm.kind[0] == "snapshot" and len(cm.prefix.key_of) == 4
    cm.free(b)
    cm.check()
