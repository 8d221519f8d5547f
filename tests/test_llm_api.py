"""The offline API: prompt forms, n, seeds, logprobs, streaming, chat (parsers, thinking budget), defaults."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine_support import engine_llm, make_model, random_prompts, write_config

import qwen35
from qwen35 import SamplingParams
from qwen35.chat import parse


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_model(write_config(tmp_path_factory.mktemp("small") / "m"))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The real vocabulary (needed for text prompts and the chat template), tiny everything else."""
    folder = write_config(tmp_path_factory.mktemp("big") / "m", vocab_size=248320)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [248046, 248044], "temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True}))
    model = make_model(folder)
    return qwen35.LLM(model, tokenizer=qwen35.load_tokenizer(folder), generation_config=str(folder),
                      kv_cache_memory_bytes=1 << 22), folder


def test_prompt_forms_and_output_shape(small, big):
    llm = engine_llm(small, kv_cache_memory_bytes=1 << 22)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a = llm.generate([1, 2, 3], sp)  # one prompt as token ids
    b = llm.generate({"prompt_token_ids": [1, 2, 3]}, sp)
    c = llm.generate([[1, 2, 3], torch.tensor([1, 2, 3])], sp)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids == c[0].outputs[0].token_ids \
        == c[1].outputs[0].token_ids
    out = a[0]
    assert out.prompt is None and out.prompt_token_ids == [1, 2, 3] and out.finished
    co = out.outputs[0]
    assert (co.index, co.finish_reason, co.stop_reason, co.cumulative_logprob, co.logprobs) == \
        (0, "length", None, None, None)
    assert co.text == ""  # no tokenizer
    bllm, _ = big
    text = bllm.generate("Hello, world", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert text.prompt == "Hello, world" and text.prompt_token_ids == bllm.tokenizer.encode("Hello, world")
    assert text.outputs[0].text == bllm.tokenizer.decode(text.outputs[0].token_ids, skip_special_tokens=True)


def test_seeds_and_n(small):
    llm = engine_llm(small, kv_cache_memory_bytes=1 << 22)
    p = random_prompts([20])[0]
    sp = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=7)
    first = llm.generate([p], sp)[0].outputs[0].token_ids
    assert llm.generate([p], sp)[0].outputs[0].token_ids == first
    batched = llm.generate(random_prompts([5, 30, 2], seed=4) + [p], sp)[-1].outputs[0].token_ids
    assert batched == first
    assert llm.generate([p], sp.clone(seed=8))[0].outputs[0].token_ids != first
    multi = llm.generate([p], sp.clone(n=3))[0]
    assert [c.index for c in multi.outputs] == [0, 1, 2]
    assert multi.outputs[0].token_ids == first  # child i uses seed + i
    assert len({tuple(c.token_ids) for c in multi.outputs}) == 3
    # unseeded requests draw from the LLM's seed: two engines with the same seed agree
    free = sp.clone(seed=None)
    x = engine_llm(small, kv_cache_memory_bytes=1 << 22, seed=11).generate([p, p], free)
    y = engine_llm(small, kv_cache_memory_bytes=1 << 22, seed=11).generate([p, p], free)
    assert [o.outputs[0].token_ids for o in x] == [o.outputs[0].token_ids for o in y]
    assert x[0].outputs[0].token_ids != x[1].outputs[0].token_ids


def test_logprobs_match_the_model(small):
    llm = engine_llm(small, kv_cache_memory_bytes=1 << 22)
    p = random_prompts([9])[0]
    out = llm.generate([p], SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True, logprobs=2))
    co = out[0].outputs[0]
    full = torch.tensor([p + co.token_ids[:-1]])
    ref = torch.log_softmax(small(full)[0, len(p) - 1:].double(), -1)
    total = 0.0
    for i, (tok, entry) in enumerate(zip(co.token_ids, co.logprobs, strict=True)):
        assert entry[tok].logprob == pytest.approx(float(ref[i, tok]), abs=1e-4)
        assert len(entry) in (2, 3)
        best = int(ref[i].argmax())
        assert entry[best].rank == 1
        total += entry[tok].logprob
    assert co.cumulative_logprob == pytest.approx(total)


def test_generate_stream(small):
    llm = engine_llm(small, kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=16)
    prompts = random_prompts([3, 40])
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    whole = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    stream = llm.generate_stream(prompts, sp)
    got: dict[str, list[int]] = {rid: [] for rid in stream.request_ids}
    finished = []
    for d in stream:
        got[d.request_id] += d.outputs[0].token_ids
        if d.finished:
            finished.append(d.request_id)
            assert d.outputs[0].finish_reason == "length"
    assert [got[r] for r in stream.request_ids] == whole and sorted(finished) == sorted(stream.request_ids)
    # leaving early aborts what is still running and frees its cache
    it = llm.generate_stream(prompts, sp.clone(max_tokens=50))
    next(it)
    it.close()
    assert llm.engine.cache.all_free()  # freed at once
    llm.engine.step()  # the abort reports
    assert llm.engine.cache.all_free() and not llm.engine.has_unfinished_requests()
    never_iterated = llm.generate_stream(prompts, sp)
    assert llm.engine.get_num_unfinished_requests() == 2
    del never_iterated
    assert llm.engine.get_num_unfinished_requests() == 0


def test_engine_cumulative_outputs(small):
    eng = engine_llm(small, kv_cache_memory_bytes=1 << 22).engine
    rid = eng.add_request(None, [5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    lengths = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id == rid
            lengths.append(len(out.outputs[0].token_ids))
    assert lengths == [1, 2, 3, 4]


def test_defaults_from_generation_config(big):
    llm, _ = big
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k) == (0.6, 0.95, 20)
    assert llm.engine.eos_token_ids == (248046, 248044)


def test_chat_parsers_and_stream(big):
    llm, _ = big
    conv = [{"role": "user", "content": "What is 2+2?"}]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tools = [{"type": "function", "function": {"name": "add", "description": "add numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for kwargs in ({}, {"enable_thinking": False}):
        out = llm.chat(conv, sp, chat_template_kwargs=kwargs, tools=tools)[0]
        assert "<tools>" in out.prompt and out.prompt.endswith("</think>\n\n" if kwargs else "<think>\n")
        c = out.outputs[0]
        ref = parse(c.text, tools=tools, thinking=not kwargs)
        assert (c.reasoning_content, c.content, c.tool_calls) == (ref.reasoning_content, ref.content, [])
        reasoning, content = [], []
        for d in llm.chat_stream(conv, sp, chat_template_kwargs=kwargs, tools=tools):
            reasoning.append(d.outputs[0].reasoning_content or "")
            content.append(d.outputs[0].content or "")
        assert ("".join(reasoning) or None, "".join(content) or None) == (c.reasoning_content, c.content)
    two = llm.chat([conv, conv + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure?"}]], sp)
    assert len(two) == 2 and two[1].prompt.count("<|im_start|>user") == 2


def test_thinking_budget_forces_the_end_of_reasoning(big):
    llm, _ = big
    tok = llm.tokenizer
    end = tok.encode("</think>\n\n")
    conv = [{"role": "user", "content": "Think briefly."}]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, thinking_budget=4)
    c = llm.chat(conv, sp)[0].outputs[0]
    assert c.token_ids[4:4 + len(end)] == end
    assert len(c.token_ids) == 12
    assert c.reasoning_content == (tok.decode(c.token_ids[:4]).strip() or None)
    zero = llm.chat(conv, sp.clone(thinking_budget=0))[0].outputs[0]
    assert zero.token_ids[:len(end)] == end and zero.reasoning_content is None


def test_progress_bar_for_big_batches(small, capsys):
    llm = engine_llm(small, kv_cache_memory_bytes=1 << 22)
    sp = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([[1]] * 3, sp)
    assert "Processed prompts" not in capsys.readouterr().err
    llm.generate([[1]] * 20, sp)
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate([[1]] * 20, sp, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err
