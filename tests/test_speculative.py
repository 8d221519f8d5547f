"""MTP speculative decoding: the same tokens as without it (greedy and seeded sampling), under batching, chunked
prefill, preemption, the prefix cache and stops; the target distribution; the cache's books; bad configs.

Random weights make the MTP layer's own drafts almost always wrong, which only tests rejection. So most tests
also put known continuations in as drafts (`LLMEngine.draft_override`: the MTP layer still runs, its drafts
are replaced), corrupted at a chosen rate: the verify step then keeps runs of every length, and rolls the GDN
state back to each of them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_engine_support import engine_llm, make_model, random_prompts, write_config

import qwen35
from bench.speculative import oracle_drafts
from qwen35 import SamplingParams
from qwen35.engine.speculative import SpeculativeConfig

LENGTHS = [1, 5, 17, 63, 64, 65, 200]
MAX_TOKENS = 24


def spec(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(write_config(tmp_path_factory.mktemp("tiny-mtp") / "m", mtp_num_hidden_layers=1))


def oracle(llm, refs: dict, acceptance: float, seed: int = 0):
    """Drafts = the known continuation of each prompt (`refs`: prompt ids -> output ids), each one replaced by a
    wrong token with probability 1 - acceptance (the bench's own oracle)."""
    llm.engine.draft_override = oracle_drafts(refs, acceptance, llm.engine.vocab_size, seed)
    return llm


def generate(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def check_books(llm):
    llm.engine.cache.check()
    assert llm.engine.cache.all_free()


@pytest.fixture(scope="module")
def reference(model):
    prompts = random_prompts(LENGTHS)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    off = engine_llm(model, kv_cache_memory_bytes=1 << 24)
    ref = generate(off, prompts, greedy)
    return prompts, greedy, ref, {tuple(p): r for p, r in zip(prompts, ref, strict=True)}


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_equals_mtp_off(model, reference, k):
    prompts, greedy, ref, refs = reference
    on = engine_llm(model, kv_cache_memory_bytes=1 << 24, speculative_config=spec(k))
    assert generate(on, prompts, greedy) == ref  # the layer's own drafts (almost all rejected)
    check_books(on)
    for acceptance in (1.0, 0.7, 0.3):
        oracle(on, refs, acceptance)
        assert generate(on, prompts, greedy) == ref, f"acceptance {acceptance}"
        check_books(on)
    stats = on.speculative_stats()
    assert stats["num_accepted_tokens"] > 0 and stats["drafted_per_position"][k - 1] > 0
    assert stats["accepted_per_position"][k - 1] > 0  # every rollback depth ran


def test_greedy_equals_mtp_off_in_bf16(tmp_path):
    model = make_model(write_config(tmp_path / "m", mtp_num_hidden_layers=1)).to(torch.bfloat16)
    prompts = random_prompts(LENGTHS)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ref = generate(engine_llm(model, kv_cache_memory_bytes=1 << 24), prompts, greedy)
    refs = {tuple(p): r for p, r in zip(prompts, ref, strict=True)}
    for k in (1, 4):
        on = oracle(engine_llm(model, kv_cache_memory_bytes=1 << 24, speculative_config=spec(k)), refs, 0.7)
        assert generate(on, prompts, greedy) == ref, f"k={k}"
        check_books(on)


def test_chunked_prefill_prefix_cache_and_preemption(model, reference):
    prompts, greedy, ref, refs = reference
    # chunked prefill: 48 tokens a step; the prefix cache on (the default); each prompt twice, so that the second
    # copies start from the first's cached blocks and snapshots
    on = oracle(engine_llm(model, kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=48,
                           speculative_config=spec(3)), refs, 0.7)
    assert generate(on, prompts + prompts, [greedy] * (2 * len(prompts))) == ref + ref
    assert on.engine.prefix_cache_stats()["hit_tokens"] > 0
    check_books(on)
    # a cache that holds the longest request but not all: sequences are preempted and recomputed mid-decode
    from qwen35.model.cache import CacheLayout

    long_prompts = random_prompts([20] * 8, seed=5)
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    long_ref = generate(engine_llm(model, kv_cache_memory_bytes=1 << 24), long_prompts, long)
    lay = CacheLayout.of(model.config.text, torch.float32, extra_attention_layers=1)
    tight = oracle(engine_llm(model, kv_cache_memory_bytes=40 * lay.region_bytes, max_num_seqs=8,
                              max_model_len=256, speculative_config=spec(2)),
                   {tuple(p): r for p, r in zip(long_prompts, long_ref, strict=True)}, 0.8)
    assert generate(tight, long_prompts, long) == long_ref
    assert tight.engine.scheduler.num_preemptions > 0
    check_books(tight)


def test_stops_inside_an_accepted_run_cut_exactly(model, reference):
    prompts, _, ref, refs = reference
    on = oracle(engine_llm(model, kv_cache_memory_bytes=1 << 24, speculative_config=spec(4)), refs, 1.0)
    off = engine_llm(model, kv_cache_memory_bytes=1 << 24)
    for i in range(len(prompts)):
        stop = ref[i][7]  # every draft is right: the stop token comes in the middle of a verify step's run
        sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop])
        want = generate(off, [prompts[i]], sp)
        assert want[0][-1] == stop and len(want[0]) <= 8
        assert generate(on, [prompts[i]], sp) == want
        eos = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        on.engine.eos_token_ids = off.engine.eos_token_ids = (stop,)
        assert generate(on, [prompts[i]], eos) == generate(off, [prompts[i]], eos)
        on.engine.eos_token_ids = off.engine.eos_token_ids = qwen35.engine.llm_engine.DEFAULT_EOS_TOKEN_IDS
        for n in (1, 2, 3, 6, 11):  # max_tokens: drafts never run past it
            sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            assert generate(on, [prompts[i]], sp) == [ref[i][:n]]
    check_books(on)


def test_seeded_sampling_equals_mtp_off(model, reference):
    prompts = reference[0]
    params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=100 + i, max_tokens=MAX_TOKENS,
                             ignore_eos=True, repetition_penalty=1.3 if i % 2 else 1.0,
                             frequency_penalty=0.5 if i % 3 == 0 else 0.0, min_tokens=4 if i == 2 else 0,
                             logprobs=3 if i == 1 else None) for i in range(len(prompts))]
    off = engine_llm(model, kv_cache_memory_bytes=1 << 24)
    want = off.generate(prompts, params, use_tqdm=False)
    ref = [o.outputs[0].token_ids for o in want]
    refs = {tuple(p): r for p, r in zip(prompts, ref, strict=True)}
    for k, acceptance in ((1, 0.9), (3, 0.6)):
        on = oracle(engine_llm(model, kv_cache_memory_bytes=1 << 24, speculative_config=spec(k)), refs, acceptance)
        got = on.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == ref
        for a, b in zip(got[1].outputs[0].logprobs, want[1].outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys() and all(math.isclose(a[t].logprob, b[t].logprob, abs_tol=1e-5) for t in a)
        assert on.speculative_stats()["num_accepted_tokens"] > 0
        check_books(on)


def test_sampled_pairs_follow_the_target_distribution(model):
    """The first two sampled tokens over many seeds, with a draft for the second one (the target's most likely
    token: accepted often, not always), against the target's own joint distribution (chi-square)."""
    prompt = random_prompts([9], seed=3)[0]
    sp = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)  # a draft for the 2nd: 1 left
    probe = engine_llm(model, kv_cache_memory_bytes=1 << 24)

    def top3(ids):
        out = probe.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=3), use_tqdm=False)
        lps = out[0].outputs[0].logprobs[0]
        ranked = sorted(lps.items(), key=lambda kv: kv[1].rank or 99)[:3]
        p = torch.tensor([math.exp(v.logprob) for _, v in ranked])
        return [t for t, _ in ranked], p / p.sum()

    firsts, p0 = top3(prompt)
    joint = {}
    best_second = {}
    for x, px in zip(firsts, p0.tolist(), strict=True):
        seconds, p1 = top3(prompt + [x])
        best_second[x] = seconds[0]
        for y, py in zip(seconds, p1.tolist(), strict=True):
            joint[(x, y)] = px * py
    on = engine_llm(model, kv_cache_memory_bytes=1 << 24, speculative_config=spec(1))
    on.engine.draft_override = lambda seq, d: [best_second[seq.token_ids[-1]]]
    n = 1500
    outs = on.generate([prompt] * n, [sp.clone(seed=s) for s in range(n)], use_tqdm=False)
    counts = {key: 0 for key in joint}
    for o in outs:
        counts[tuple(o.outputs[0].token_ids[:2])] += 1
    chi2 = sum((counts[key] - n * p) ** 2 / (n * p) for key, p in joint.items())
    # 8 degrees of freedom: P(chi2 > 26.1) = 0.001
    assert chi2 < 26.1, (chi2, counts, joint)
    stats = on.speculative_stats()
    assert 0 < stats["num_accepted_tokens"] < stats["num_draft_tokens"]


def test_speculative_config_errors(model, tmp_path):
    for bad, words in (({"method": "eagle", "num_speculative_tokens": 2}, "method 'eagle'"),
                       ({"method": "mtp", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "mtp", "num_speculative_tokens": 5}, "num_speculative_tokens"),
                       ({"method": "mtp"}, "num_speculative_tokens"),
                       ({"method": "mtp", "num_speculative_tokens": 2, "model": "x"}, "unknown keys"),
                       ("{not json", "not JSON"), (3, "must be a dict")):
        with pytest.raises(ValueError, match=words):
            SpeculativeConfig.parse(bad)
    assert SpeculativeConfig.parse(json.dumps(spec(2))) == SpeculativeConfig("mtp", 2)
    assert SpeculativeConfig.parse({"method": "qwen3_next_mtp", "num_speculative_tokens": 1}).method == "mtp"
    no_mtp = make_model(write_config(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no mtp.. weights"):
        engine_llm(no_mtp, speculative_config=spec(2))
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 is not supported"):
        qwen35.LLM(str(tmp_path / "plain"), load_format="dummy", tensor_parallel_size=2, speculative_config=spec(1))


def test_server_streams_with_mtp_and_reports_it(tmp_path):
    """`qwen35 serve --speculative-config ...` as a real process, driven by the openai client: streamed and
    whole completions alike, and the speculation counters on /metrics."""
    import openai
    from test_server_support import call, start_serve_process, stop_serve_process

    proc, port, log = start_serve_process(tmp_path, "--speculative-config", json.dumps(spec(2)), "--dtype",
                                          "float32", config={"mtp_num_hidden_layers": 1})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        kw = dict(model="tiny", prompt="The capital of France is", max_tokens=12, temperature=0)
        whole = client.completions.create(**kw).choices[0].text
        pieces = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
        assert "".join(pieces) == whole
        metrics = call(port, "GET", "/metrics").body.decode()
        drafted = [line for line in metrics.splitlines() if line.startswith("qwen35_spec_decode_num_draft_tokens")]
        assert drafted and float(drafted[0].split()[-1]) > 0
        assert 'qwen35_spec_decode_num_accepted_tokens_per_pos_total{position="1"}' in metrics
    finally:
        stop_serve_process(proc, log)


def test_stop_strings_and_thinking_budget_with_the_real_vocabulary(tmp_path):
    folder = write_config(tmp_path / "big", vocab_size=248320, mtp_num_hidden_layers=1)
    model = make_model(folder)
    tok = qwen35.load_tokenizer(folder)
    off = qwen35.LLM(model, tokenizer=tok, kv_cache_memory_bytes=1 << 23)
    on = qwen35.LLM(model, tokenizer=tok, kv_cache_memory_bytes=1 << 23, speculative_config=spec(3))
    conv = [{"role": "user", "content": "Think briefly."}]
    for budget in (0, 2, 5):
        sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, thinking_budget=budget)
        first = off.chat(conv, sp)[0]
        want = first.outputs[0]
        # every draft right: the budget's forced end of the reasoning comes inside accepted runs
        oracle(on, {tuple(first.prompt_token_ids): want.token_ids}, 1.0)
        got = on.chat(conv, sp)[0].outputs[0]
        assert (got.token_ids, got.text) == (want.token_ids, want.text), budget
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = "Once upon a time"
    base = off.generate([prompt], plain, use_tqdm=False)[0].outputs[0]
    oracle(on, {tuple(off.engine.prepare_prompt(prompt).ids): base.token_ids}, 1.0)
    at = next(i for i in range(len(base.text) // 2, len(base.text)) if base.text[i].strip())
    sp = plain.clone(stop=[base.text[at:at + 2]])  # a stop string in the middle of the text
    want = off.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    got = on.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    assert want.finish_reason == "stop" and len(want.text) < len(base.text)
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    check_books(on)


def test_decode_snapshots_on_the_grid_inside_verify_runs(model):
    """While decoding, a sequence keeps a GDN snapshot at its latest 64-token grid point; with drafts a verify
    step's run often steps over it (the state there is a draft slot's, kept as the snapshot): a follow-up
    prompt hits as deep as without MTP, and its tokens are the same."""
    prompt = random_prompts([20], seed=9)[0]
    sp = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    off = engine_llm(model, kv_cache_memory_bytes=1 << 24)
    out = generate(off, [prompt], sp)[0]
    follow = prompt + out[:140] + [1, 2, 3]
    short = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = off.generate([follow], short, use_tqdm=False)[0]
    assert want.num_cached_tokens == 128
    for k in (3, 4):
        on = oracle(engine_llm(model, kv_cache_memory_bytes=1 << 24, speculative_config=spec(k)),
                    {tuple(prompt): out}, 1.0)
        assert generate(on, [prompt], sp)[0] == out
        got = on.generate([follow], short, use_tqdm=False)[0]
        assert got.num_cached_tokens == 128 and got.outputs[0].token_ids == want.outputs[0].token_ids
        check_books(on)


def test_a_failed_verify_step_gives_its_draft_slots_back(model, reference):
    prompts, greedy, ref, refs = reference
    on = oracle(engine_llm(model, kv_cache_memory_bytes=1 << 24, speculative_config=spec(3)), refs, 1.0)
    eng = on.engine
    real = eng.runner.execute
    calls = {"n": 0}

    def fail_on_a_verify_step(step):
        if step.chains and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("injected failure")
        return real(step)

    eng.runner.execute = fail_on_a_verify_step
    rid = eng.add_request(None, {"prompt_token_ids": prompts[3]}, greedy)
    with pytest.raises(RuntimeError, match="injected failure"):
        while eng.has_unfinished_requests():
            eng.step()
    eng.cache.check()
    eng.abort_request(rid)
    eng.step()
    check_books(on)
    assert generate(on, prompts[:2], greedy) == ref[:2]  # and it goes on serving
