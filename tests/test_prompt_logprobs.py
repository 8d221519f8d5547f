"""Prompt logprobs (`SamplingParams.prompt_logprobs`): computed by the engine in the prompt's own forward, held to
a slow twin (the whole prompt through the padded forward, then log-softmax) and to transformers, across chunked
prefill, batching, the prefix cache, preemption and streaming."""

from __future__ import annotations

import pytest
import torch
from test_engine_support import engine_llm, make_model, random_prompts, write_config

import qwen35
from conftest import make_hf_model, save_hf
from qwen35 import SamplingParams
from qwen35.model.cache import CacheLayout

TOP = 5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(write_config(tmp_path_factory.mktemp("tiny") / "m"))


def twin(model, prompt: list[int]) -> torch.Tensor:
    """[len - 1, V] logprobs of each next prompt token: the whole prompt in one plain forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).float()[0, :-1], dim=-1)


def assert_matches_twin(entries, prompt: list[int], ref: torch.Tensor, top: int = TOP, tol: float = 1e-5) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for pos in range(1, len(prompt)):
        d, row, tok = entries[pos], ref[pos - 1], prompt[pos]
        own = d[tok]
        assert abs(own.logprob - float(row[tok])) <= tol, f"position {pos}"
        # the rank among the twin's logprobs, up to tokens within `tol` of this one (the two forwards agree to
        # rounding, and a near-tie may order either way)
        above, near = int((row > row[tok] + tol).sum()), int((row > row[tok] - tol).sum())
        assert above + 1 <= own.rank <= near, f"position {pos}"  # (near counts the token itself)
        best = [t for t, lp in sorted(d.items(), key=lambda x: x[1].rank) if lp.rank <= top]
        assert best == torch.topk(row, top).indices.tolist(), f"position {pos}"
        assert set(d) == set(best) | {tok}  # the top-N and the prompt's own token, nothing else


def own_logprobs(entries, prompt: list[int]) -> list[float]:
    return [entries[pos][prompt[pos]].logprob for pos in range(1, len(prompt))]


def test_equal_to_the_twin_across_chunk_boundaries(model):
    # chunks of 48 tokens: the last row of every chunk predicts the first token of the next one
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=48)
    prompts = random_prompts([1, 2, 47, 48, 49, 150], seed=1)
    outs = llm.generate(prompts, SamplingParams(prompt_logprobs=TOP, max_tokens=1, temperature=0), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert_matches_twin(out.prompt_logprobs, prompt, twin(model, prompt))
        assert len(out.outputs[0].token_ids) == 1
    assert llm.engine.cache.all_free()


def test_zero_top_gives_the_prompt_token_alone_and_blocks_bound_the_logits(model, monkeypatch):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=4096)
    llm.engine.runner.prompt_block_rows = 7  # the head over at most 7 prompt rows at a time
    shapes = []
    real = model.compute_logits

    def spy(hidden, dtype=None):
        shapes.append(hidden.shape[0])
        return real(hidden, dtype)

    monkeypatch.setattr(model, "compute_logits", spy)
    prompt = random_prompts([100], seed=2)[0]
    out = llm.generate([prompt], SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.7, seed=1),
                       use_tqdm=False)[0]
    assert max(shapes) <= 7 and sum(s for s in shapes if s == 7) >= 98  # 99 prompt rows in blocks of 7
    monkeypatch.undo()
    ref = twin(model, prompt)
    for pos in range(1, len(prompt)):
        assert list(out.prompt_logprobs[pos]) == [prompt[pos]]
        assert abs(out.prompt_logprobs[pos][prompt[pos]].logprob - float(ref[pos - 1, prompt[pos]])) < 1e-5


def test_batched_with_other_requests_and_n(model):
    prompts = random_prompts([130, 70, 200, 33], seed=3)
    with_lp = SamplingParams(prompt_logprobs=2, max_tokens=4, temperature=0, ignore_eos=True)
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    sampled_n = SamplingParams(prompt_logprobs=1, n=3, max_tokens=3, temperature=1.0, seed=7, ignore_eos=True)
    params = [with_lp, plain, sampled_n, plain]
    alone_llm = engine_llm(model, kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=4096)
    alone = [alone_llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params, strict=True)]
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=64)
    together = llm.generate(prompts, params, use_tqdm=False)
    for p, sp, a, t in zip(prompts, params, alone, together, strict=True):
        assert [c.token_ids for c in t.outputs] == [c.token_ids for c in a.outputs]
        if sp.prompt_logprobs is None:
            assert t.prompt_logprobs is None
            continue
        assert_matches_twin(t.prompt_logprobs, p, twin(model, p), top=sp.prompt_logprobs)
        assert max(abs(x - y) for x, y in zip(own_logprobs(t.prompt_logprobs, p), own_logprobs(a.prompt_logprobs, p),
                                              strict=True)) < 1e-5
    assert llm.engine.cache.all_free()


def test_not_served_from_the_prefix_cache_but_fills_it(model):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 26, max_num_batched_tokens=512)
    base = random_prompts([300], seed=4)[0]
    tail_a, tail_b = random_prompts([20, 30], seed=5)
    greedy = SamplingParams(max_tokens=3, temperature=0)
    llm.generate([base + tail_a], greedy, use_tqdm=False)  # now cached
    with_lp = llm.generate([base + tail_b], SamplingParams(prompt_logprobs=3, max_tokens=3, temperature=0),
                           use_tqdm=False)[0]
    assert with_lp.num_cached_tokens == 0  # every position computed: each needs its logits
    assert_matches_twin(with_lp.prompt_logprobs, base + tail_b, twin(model, base + tail_b), top=3)
    # what the prompt-logprobs request computed is cached for the others
    llm.reset_prefix_cache()
    llm.generate([base + tail_b], SamplingParams(prompt_logprobs=0, max_tokens=1), use_tqdm=False)
    after = llm.generate([base + tail_b + tail_a], greedy, use_tqdm=False)[0]
    assert after.num_cached_tokens >= 256
    llm.engine.cache.check()


def test_through_preemption(model):
    lay = CacheLayout.of(model.config.text, torch.float32)
    budget = 80 * lay.region_bytes  # far from what the four requests need at once: preemption
    llm = engine_llm(model, kv_cache_memory_bytes=budget, max_num_seqs=4, max_model_len=1024,
                     max_num_batched_tokens=200)
    prompts = random_prompts([400, 420, 440, 460], seed=6)
    outs = llm.generate(prompts, SamplingParams(prompt_logprobs=2, max_tokens=40, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for p, out in zip(prompts, outs, strict=True):
        assert_matches_twin(out.prompt_logprobs, p, twin(model, p), top=2)
    assert llm.engine.cache.all_free()


def test_streamed_once_in_the_first_output(model):
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=64)
    prompt = random_prompts([90], seed=8)[0]
    outs = list(llm.generate_stream([prompt], SamplingParams(prompt_logprobs=1, max_tokens=5, n=2, temperature=0,
                                                             ignore_eos=True)))
    have = [o.prompt_logprobs is not None for o in outs]
    assert have[0] and not any(have[1:])
    assert_matches_twin(outs[0].prompt_logprobs, prompt, twin(model, prompt), top=1)


def test_bad_values_name_the_field(model):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=True)
    llm = engine_llm(model, kv_cache_memory_bytes=1 << 24)
    with pytest.raises(ValueError, match="prompt_logprobs must be <= 20"):
        llm.generate([[1, 2, 3]], SamplingParams(prompt_logprobs=21), use_tqdm=False)
    assert llm.engine.cache.all_free()


def test_equal_to_transformers(tmp_path):
    hf = make_hf_model("causal", vision=False).float()
    folder = save_hf(hf, tmp_path / "hf")
    llm = qwen35.LLM(str(folder), skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=32)
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, 120, (80,), generator=g).tolist()
    out = llm.generate([prompt], SamplingParams(prompt_logprobs=TOP, max_tokens=1), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits.float()[0, :-1], dim=-1)
    assert_matches_twin(out.prompt_logprobs, prompt, ref, tol=1e-4)


def test_over_two_ranks_equal_to_one_process(tmp_path):
    """Under tensor parallelism every rank runs the head over the prompt rows (the sharded head gathers the
    logits): the prompt logprobs of one process."""
    folder = save_hf(make_hf_model("causal", seed=3, vocab_size=132, num_attention_heads=4, num_key_value_heads=2,
                                   linear_num_key_heads=4, linear_num_value_heads=8), tmp_path / "hf")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 120, (n,), generator=g).tolist() for n in (90, 40)]
    params = SamplingParams(prompt_logprobs=3, max_tokens=2, temperature=0)
    kw = dict(skip_tokenizer_init=True, max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 24)
    alone = qwen35.LLM(str(folder), **kw).generate(prompts, params, use_tqdm=False)
    llm = qwen35.LLM(str(folder), tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.close_workers()
    for p, a, b in zip(prompts, alone, got, strict=True):
        assert [set(d) for d in b.prompt_logprobs[1:]] == [set(d) for d in a.prompt_logprobs[1:]]
        assert max(abs(x - y) for x, y in zip(own_logprobs(b.prompt_logprobs, p), own_logprobs(a.prompt_logprobs, p),
                                              strict=True)) <= 1e-5
