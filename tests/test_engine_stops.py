"""Stop rules: stop strings across token boundaries, stop token ids, EOS, min_tokens, max_tokens, streaming."""

from __future__ import annotations

import json

import pytest
from test_engine_support import make_model, random_prompts, write_config

import qwen35
from qwen35 import SamplingParams

N = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = write_config(tmp_path_factory.mktemp("stops") / "m")
    model = make_model(folder)
    tok = qwen35.load_tokenizer(None)
    llm = qwen35.LLM(model, tokenizer=tok, kv_cache_memory_bytes=1 << 22)
    prompt = random_prompts([12], seed=2)[0]
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=N, ignore_eos=True,
                                                 skip_special_tokens=False))[0].outputs[0]
    detok = tok.detokenizer()
    pieces = [detok.add(t) for t in base.token_ids]  # the text each token adds (bytes may wait for the next)
    assert "".join(pieces) + detok.finish() == base.text
    return llm, tok, prompt, base, pieces


def _ascii(s: str) -> bool:
    return bool(s) and all(32 <= ord(c) < 127 for c in s)


def _greedy(**kw):
    return SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, skip_special_tokens=False, **kw)


def test_stop_string_across_token_boundary(setup):
    llm, tok, prompt, base, pieces = setup
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(2, N - 1) if _ascii(pieces[i]) and _ascii(pieces[i + 1])
             and base.text.find(pieces[i][-1] + pieces[i + 1][0]) == sum(map(len, pieces[:i + 1])) - 1)
    stop = pieces[k][-1] + pieces[k + 1][0]
    cut = base.text.find(stop)
    out = llm.generate([prompt], _greedy(stop=["never-there", stop]))[0].outputs[0]
    assert out.text == base.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == base.token_ids[:k + 2]  # the token completing the stop string is kept in ids
    inc = llm.generate([prompt], _greedy(stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == base.text[:cut + len(stop)]
    # streamed: the deltas add up to the same text, and no delta ever shows a piece of the stop string
    text = ""
    for d in llm.generate_stream([prompt], _greedy(stop=[stop])):
        text += d.outputs[0].text
        assert base.text[:cut].startswith(text)  # never a character that the stop string later removes
    assert text == base.text[:cut]


def test_stop_string_inside_one_token(setup):
    llm, tok, prompt, base, pieces = setup
    k = next(i for i in range(1, N) if len(pieces[i]) >= 3 and _ascii(pieces[i])
             and base.text.find(pieces[i][1:]) == sum(map(len, pieces[:i])) + 1)
    stop = pieces[k][1:]
    out = llm.generate([prompt], _greedy(stop=stop))[0].outputs[0]
    assert out.text == base.text[:base.text.find(stop)] and out.finish_reason == "stop"


def test_stop_token_ids_and_min_tokens(setup):
    llm, tok, prompt, base, pieces = setup
    t = base.token_ids[3]
    first = base.token_ids.index(t)
    out = llm.generate([prompt], _greedy(stop_token_ids=[t]))[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == t
    assert out.text == tok.decode(base.token_ids[:first])  # the stop token's text is not part of the output
    # min_tokens: the stop token cannot come before min_tokens tokens
    out = llm.generate([prompt], _greedy(stop_token_ids=[t], min_tokens=first + 3))[0].outputs[0]
    assert t not in out.token_ids[:first + 3]
    assert len(out.token_ids) >= first + 3


def test_eos_and_ignore_eos(setup, tmp_path):
    llm, tok, prompt, base, pieces = setup
    eos = base.token_ids[5]
    first = base.token_ids.index(eos)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 100000]}))
    llm2 = qwen35.LLM(llm.model, tokenizer=tok, kv_cache_memory_bytes=1 << 22, generation_config=str(tmp_path))
    assert llm2.engine.eos_token_ids == (eos, 100000)
    params = SamplingParams(temperature=0, max_tokens=N, skip_special_tokens=False)
    out = llm2.generate([prompt], params)[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop" and out.stop_reason is None
    out = llm2.generate([prompt], params.clone(ignore_eos=True))[0].outputs[0]
    assert out.token_ids == base.token_ids and out.finish_reason == "length"
    out = llm2.generate([prompt], params.clone(min_tokens=first + 2))[0].outputs[0]
    assert eos not in out.token_ids[:first + 2]


def test_max_tokens_is_length(setup):
    llm, tok, prompt, base, pieces = setup
    out = llm.generate([prompt], _greedy().clone(max_tokens=7))[0].outputs[0]
    assert out.token_ids == base.token_ids[:7] and out.finish_reason == "length" and out.stop_reason is None
    assert out.text == tok.decode(base.token_ids[:7])


def test_padding_ids_have_no_text(setup):
    from qwen35.engine.detokenize import OutputText

    llm, tok, prompt, base, pieces = setup
    text = OutputText(tok, stop=["x"])
    assert text.append(tok.encode("a")[0]) is None
    assert text.append(248300) is None  # in the model's padded vocabulary, not in the tokenizer's
    text.finish()
    assert text.text == "a"
