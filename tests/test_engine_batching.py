"""Exactness of the engine under batching, chunked prefill and preemption; cache accounting; bad input."""

from __future__ import annotations

import collections
import threading
import time

import pytest
import torch
from test_engine_support import engine_llm, make_model, random_prompts, write_config

from qwen35 import SamplingParams
from qwen35.model.cache import CacheLayout

LENGTHS = [1, 2, 5, 16, 17, 63, 200, 513, 1000, 2000]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(write_config(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt generated alone, unchunked (one forward per prompt)."""
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=4096)
    prompts = random_prompts(LENGTHS)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    sampled = [SamplingParams(temperature=1.0, top_k=50, seed=100 + i, max_tokens=MAX_TOKENS, ignore_eos=True)
               for i in range(len(prompts))]
    g = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    s = [llm.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, sampled, strict=True)]
    return prompts, greedy, sampled, g, s


def _check_together(llm, alone):
    prompts, greedy, sampled, ref_greedy, ref_sampled = alone
    outs = llm.generate(prompts + prompts, [greedy] * len(prompts) + sampled, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    for i, n in enumerate(LENGTHS):
        assert got[i] == ref_greedy[i], f"greedy, prompt of {n} tokens"
        assert got[len(prompts) + i] == ref_sampled[i], f"seeded sampling, prompt of {n} tokens"
    assert all(len(t) == MAX_TOKENS for t in got)
    assert llm.engine.cache.all_free()


def test_batch_invariance_with_chunked_prefill(model, alone):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=48)
    _check_together(llm, alone)
    assert llm.engine.scheduler.num_preemptions == 0


def test_batch_invariance_under_preemption(model, alone):
    lay = CacheLayout.of(model.config.text, torch.float32)
    assert lay.blocks_per_region == 1  # the tiny model's state is a block's size
    # Room for the longest request (2008 tokens = 126 blocks) and a bit more, far from all of them (~490 blocks).
    budget = 151 * lay.region_bytes
    llm = engine_llm(model, kv_cache_memory_bytes=budget, max_num_seqs=8, max_model_len=2048,
                     max_num_batched_tokens=300)
    assert llm.engine.plan.num_regions == 151
    _check_together(llm, alone)
    assert llm.engine.scheduler.num_preemptions > 0


def test_preemption_while_decoding_recomputes_generated_tokens(model, monkeypatch):
    prompts = random_prompts([90, 100, 110, 120], seed=3)
    params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=1, max_tokens=60, ignore_eos=True)] * 2
    ref = engine_llm(model, kv_cache_memory_bytes=1 << 22)
    expected = [ref.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    lay = CacheLayout.of(model.config.text, torch.float32)
    llm = engine_llm(model, kv_cache_memory_bytes=27 * lay.region_bytes, max_num_seqs=4, max_model_len=192)
    generated_at_preemption = []
    original = llm.engine.scheduler._preempt

    def spy(seq, out):
        generated_at_preemption.append(seq.num_output_tokens)
        original(seq, out)

    monkeypatch.setattr(llm.engine.scheduler, "_preempt", spy)
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert max(generated_at_preemption) > 0  # sequences were preempted after generating, and rebuilt
    assert llm.engine.cache.all_free()


def test_request_that_can_never_fit_is_refused(model):
    lay = CacheLayout.of(model.config.text, torch.float32)
    with pytest.raises(ValueError, match="max_model_len"):
        engine_llm(model, kv_cache_memory_bytes=10 * lay.region_bytes, max_model_len=1000)
    llm = engine_llm(model, kv_cache_memory_bytes=10 * lay.region_bytes)  # max_model_len follows the budget
    plan = llm.engine.plan
    assert llm.engine.max_model_len == (plan.num_regions - 1) * plan.blocks_per_region * 16 == 144
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * llm.engine.max_model_len], SamplingParams(max_tokens=2))
    prompt_len = llm.engine.max_model_len - 10
    out = llm.generate([[1] * prompt_len], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 10


def test_thousand_short_requests_free_everything(model):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 22, max_num_seqs=64, max_num_batched_tokens=256)
    g = torch.Generator().manual_seed(5)
    prompts, params = [], []
    for i in range(1000):
        prompts.append(torch.randint(0, 512, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist())
        params.append(SamplingParams(temperature=0.0 if i % 2 else 0.9, max_tokens=1 + i % 3, ignore_eos=True,
                                     stop_token_ids=[7] if i % 5 == 0 else None))
    outs = llm.generate(prompts, params)
    assert len(outs) == 1000 and all(o.finished for o in outs)
    assert all(1 <= len(o.outputs[0].token_ids) <= 3 for o in outs)
    assert llm.engine.cache.all_free()
    assert not llm.engine.has_unfinished_requests()
    usage = llm.engine.cache_usage()
    assert usage["running"] == usage["waiting"] == 0


def test_abort_frees_everything(model):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=32)
    eng = llm.engine
    long_p, short_p = random_prompts([300, 4], seed=9)
    sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, output_kind="delta")
    b = eng.add_request("b", short_p, sp)  # decoding when aborted
    c = eng.add_request(None, short_p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    seen: dict[str, list] = {b: [], c: []}
    for out in eng.step():
        seen[out.request_id].append(out)
    a = eng.add_request("a", long_p, sp)   # still prefilling when aborted
    seen[a] = []
    for _ in range(3):
        for out in eng.step():
            seen[out.request_id].append(out)
    assert seen[b] and not seen[a]
    eng.abort_request([a, b])
    eng.abort_request("unknown-id")  # ignored
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen[out.request_id].append(out)
    assert seen[a][-1].finished and seen[a][-1].outputs[0].finish_reason == "abort"
    assert seen[b][-1].finished and seen[b][-1].outputs[0].finish_reason == "abort"
    assert sum(len(o.outputs[0].token_ids) for o in seen[b]) < 50  # deltas: only what was generated
    assert seen[c][-1].outputs[0].finish_reason == "length"
    assert eng.cache.all_free()


def test_bad_input_raises_and_engine_keeps_serving(model):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 22, max_model_len=256)
    ok = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    expected = llm.generate([[1, 2, 3]], ok)[0].outputs[0].token_ids
    bad_calls = [
        lambda: llm.generate([[1, 512]], ok),                       # beyond the vocabulary
        lambda: llm.generate([[-1, 2]], ok),
        lambda: llm.generate([[1] * 256], ok),                      # longer than max_model_len allows
        lambda: llm.generate([[]], ok),                             # empty
        lambda: llm.generate([{"prompt_token_ids": [1, 2]}, [3, 1000], [4]], ok),  # one bad in a batch
        lambda: llm.generate(["text needs a tokenizer"], ok),
        lambda: llm.generate([[1, 2]], SamplingParams(logprobs=21)),
        lambda: llm.generate([[1, 2], [3]], [ok]),                  # params count mismatch
        lambda: llm.generate([{"foo": 1}], ok),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.cache.all_free()
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request("x", [1], ok)
        llm.engine.add_request("x", [1], ok)
    llm.engine.abort_request("x")
    assert llm.generate([[1, 2, 3]], ok)[0].outputs[0].token_ids == expected
    assert llm.engine.cache.all_free()


def test_requests_added_and_aborted_from_another_thread(model):
    """A server steps in one thread and adds / aborts from others."""
    eng = engine_llm(model, kv_cache_memory_bytes=1 << 22).engine
    outs: dict[str, list] = collections.defaultdict(list)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if eng.has_unfinished_requests():
                for o in eng.step():
                    outs[o.request_id].append(o)
            else:
                time.sleep(0.001)

    stepper = threading.Thread(target=loop)
    stepper.start()
    try:
        sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, output_kind="delta")
        ids = [eng.add_request(None, p, sp) for p in random_prompts([5] * 9, seed=1)]
        eng.abort_request(ids[::3])
        deadline = time.monotonic() + 60
        while not all(outs[i] and outs[i][-1].finished for i in ids) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        stepper.join()
    for i, rid in enumerate(ids):
        reason = outs[rid][-1].outputs[0].finish_reason
        n = sum(len(o.outputs[0].token_ids) for o in outs[rid])
        if i % 3:
            assert reason == "length" and n == 20
        else:
            assert reason in ("abort", "length") and n <= 20
    assert eng.cache.all_free() and not eng.has_unfinished_requests()


def test_large_state_and_a_budget_for_the_longest_request_runs_everything(tmp_path):
    """A GDN state of ~17 KV blocks and a budget that holds the longest request alone but far from all: every
    request runs (fewer at once), none is refused or cut, and each gets the tokens it gets alone. (With state
    slots reserved up front for max_num_seqs, such a budget lowered max_model_len below the longest prompt.)"""
    big = make_model(write_config(tmp_path / "big", linear_num_key_heads=2, linear_num_value_heads=8,
                                  linear_key_head_dim=32, linear_value_head_dim=32))
    lay = CacheLayout.of(big.config.text, torch.float32)
    assert lay.blocks_per_region >= 16
    lengths = [1500, 700, 90, 1200, 30, 400]
    prompts = random_prompts(lengths, seed=13)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone_llm = engine_llm(big, kv_cache_memory_bytes=64 << 20)
    alone_out = [alone_llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    need = -(-(1500 + 12) // (16 * lay.blocks_per_region)) + 1  # the longest request: its blocks and its state
    llm = engine_llm(big, kv_cache_memory_bytes=need * lay.region_bytes, max_num_seqs=8, max_num_batched_tokens=512)
    assert llm.engine.max_model_len >= 1512
    running = []
    real_step = llm.engine.scheduler.schedule

    def spy():
        out = real_step()
        running.append(len(llm.engine.scheduler.running))
        return out

    llm.engine.scheduler.schedule = spy
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone_out
    assert max(running) >= 2  # the short ones ran next to each other: how many run follows what fits
    assert llm.engine.cache.all_free()
    llm.engine.cache.check()
