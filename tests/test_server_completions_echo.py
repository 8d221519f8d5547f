"""`/v1/completions` with `echo` and `logprobs` (prompt logprobs in the legacy shape), `/tokenize`, `/detokenize`,
`/tokenizer_info` and `/version`, on a real server on loopback driven by the `openai` client, and
lm-evaluation-harness's `local-completions` model scoring a small loglikelihood task against it.

The numbers the server returns are held to the engine's own prompt logprobs, from a second engine on the same
model run offline (no HTTP in between).
"""

from __future__ import annotations

import json

import openai
import pytest
from test_server_support import ServerThread, call, get_metrics, make_llm, metric, tiny_model

import qwen35
from qwen35 import SamplingParams
from qwen35.server import ServerConfig

MODEL = "tiny-qwen"
PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("echo") / "tiny")


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(make_llm(model), ServerConfig(served_model_name=MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(model):
    """The engine's own numbers, on the same weights."""
    return make_llm(model)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def engine_prompt_logprobs(offline, ids: list[int], top: int = 0):
    out = offline.generate([{"prompt_token_ids": ids}], SamplingParams(prompt_logprobs=top, max_tokens=1),
                           use_tqdm=False)[0]
    return out.prompt_logprobs


def check_prompt_part(lp, ids: list[int], entries, tok, top_n: int) -> None:
    """The first len(ids) entries of legacy logprobs `lp` are the prompt's, as the engine computed them."""
    assert lp.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(ids)):
        own = entries[pos][ids[pos]].logprob
        assert lp.token_logprobs[pos] == pytest.approx(own, abs=1e-4)
        want = {tok.decode([t]): e.logprob for t, e in entries[pos].items() if e.rank <= top_n}
        want.setdefault(tok.decode([ids[pos]]), own)
        assert lp.top_logprobs[pos] == pytest.approx(want, abs=1e-4)


def check_offsets(text: str, lp) -> None:
    assert lp.text_offset[0] == 0
    for token, start in zip(lp.tokens, lp.text_offset, strict=True):
        assert text[start:start + len(token)] == token


def test_echo_with_logprobs(client, offline):
    tok = offline.tokenizer
    ids = tok.encode(PROMPT)
    entries = engine_prompt_logprobs(offline, ids, top=3)
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=3, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text.startswith(PROMPT) and len(c.logprobs.tokens) == len(ids) + 4
    check_prompt_part(c.logprobs, ids, entries, tok, 3)
    check_offsets(c.text, c.logprobs)
    assert "".join(c.logprobs.tokens) == c.text
    # the generated part: what the same request without echo returns
    plain = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=3, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0]
    assert c.text == PROMPT + plain.text
    assert c.logprobs.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert c.logprobs.text_offset[len(ids):] == [o + len(PROMPT) for o in plain.logprobs.text_offset]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 4


def test_prompt_only_and_one_token_with_token_id_prompts(client, offline):
    tok = offline.tokenizer
    batch = [tok.encode("One plus one is two"), tok.encode("Water is wet")]
    zero = client.completions.create(model=MODEL, prompt=batch, echo=True, logprobs=1, max_tokens=0)
    one = client.completions.create(model=MODEL, prompt=batch, echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert zero.usage.completion_tokens == 0 and one.usage.completion_tokens == 2
    for i, ids in enumerate(batch):
        entries = engine_prompt_logprobs(offline, ids, top=1)
        z, o = zero.choices[i], one.choices[i]
        assert z.index == o.index == i
        assert z.text == tok.decode(ids) and z.finish_reason == "length"
        assert len(z.logprobs.tokens) == len(ids) and len(o.logprobs.tokens) == len(ids) + 1
        check_prompt_part(z.logprobs, ids, entries, tok, 1)
        check_prompt_part(o.logprobs, ids, entries, tok, 1)
        check_offsets(z.text, z.logprobs)
    # where a character spans tokens (the parrot's 4 bytes over 3 tokens), the tokens that end it start where it
    # is written: "A", " " + 2 bytes, 1 byte, 1 byte (the parrot), " bird"
    text = "A \U0001f99c bird"
    r = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=0, max_tokens=0).choices[0]
    assert r.text == text and len(tok.encode(text)) == 5 and r.logprobs.text_offset == [0, 1, 2, 2, 3]
    # echo without logprobs and max_tokens 0: the prompt alone
    bare = client.completions.create(model=MODEL, prompt="Hello there", echo=True, max_tokens=0).choices[0]
    assert bare.text == "Hello there" and bare.logprobs is None and bare.finish_reason == "length"


def test_streamed_echo_puts_the_prompt_in_the_first_chunk(client, offline):
    kw = dict(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=5, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    chunks = [ch for ch in client.completions.create(stream=True, **kw) if ch.choices]
    first = chunks[0].choices[0]
    assert first.text.startswith(PROMPT)
    assert first.logprobs.tokens[:len(offline.tokenizer.encode(PROMPT))] == \
        whole.logprobs.tokens[:len(offline.tokenizer.encode(PROMPT))]
    assert "".join(ch.choices[0].text for ch in chunks) == whole.text
    lps = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert lps[0] is None and lps[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)
    offsets = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset
    assert chunks[-1].choices[0].finish_reason == "length"
    # prompt only, streamed: one chunk with the prompt and its logprobs, then the finish
    zero = [ch for ch in client.completions.create(stream=True, **{**kw, "max_tokens": 0}) if ch.choices]
    assert "".join(ch.choices[0].text for ch in zero) == PROMPT
    assert [ch.choices[0].finish_reason for ch in zero][-1] == "length"


def test_n_choices_each_echo_the_prompt_logprobs(client, offline):
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, n=2,
                                  temperature=1.0, seed=3)
    ids = offline.tokenizer.encode(PROMPT)
    entries = engine_prompt_logprobs(offline, ids, top=1)
    for c in r.choices:
        check_prompt_part(c.logprobs, ids, entries, offline.tokenizer, 1)


def test_bad_requests(server):
    port = server.port

    def err(status, body, path="/v1/completions"):
        r = call(port, "POST", path, body)
        assert r.status == status, r.body
        return r.error

    assert err(400, {"prompt": "x", "max_tokens": 0})["param"] == "max_tokens"
    assert err(400, {"prompt": "x", "max_tokens": -1, "echo": True})["param"] == "max_tokens"
    assert err(400, {"prompt": "x", "echo": True, "logprobs": 21})["param"] == "logprobs"
    assert err(400, {}, "/tokenize")["param"] == "prompt"
    assert err(400, {"prompt": 5}, "/tokenize")["param"] == "prompt"
    assert err(400, {"messages": []}, "/tokenize")["param"] == "messages"
    assert err(400, {"messages": [{"role": "assistant", "content": "only me"}]}, "/tokenize")["code"] == "invalid_chat"
    assert err(400, {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
               "/tokenize")["param"] == "continue_final_message"
    assert err(404, {"prompt": "x", "model": "gpt-4"}, "/tokenize")["code"] == "model_not_found"
    assert err(400, {"tokens": [1, 10**7]}, "/detokenize")["param"] == "tokens"
    assert err(400, {"tokens": [-1]}, "/detokenize")["param"].startswith("tokens")
    assert err(400, {"tokens": "abc"}, "/detokenize")["param"] == "tokens"
    assert call(port, "GET", "/health").status == 200


def test_tokenize_detokenize_version(server, client, offline):
    port, tok = server.port, offline.tokenizer
    text = "Hello, world! Ça va?"
    r = call(port, "POST", "/tokenize", {"model": MODEL, "prompt": text, "add_special_tokens": True,
                                         "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.serving.max_model_len
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"]) and r["token_strs"][2] == "Ġworld"
    assert call(port, "POST", "/detokenize", {"model": MODEL, "tokens": r["tokens"]}).json() == {"prompt": text}
    # a conversation: the prompt the chat route builds (its prompt_tokens), with tools and template variables
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What time is it?"}]
    counts = set()
    for extra in ({}, {"tools": [tool]}, {"chat_template_kwargs": {"enable_thinking": False}}):
        chat = call(port, "POST", "/tokenize", {"messages": messages, **extra}).json()
        done = call(port, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 1, **extra}).json()
        assert chat["count"] == done["usage"]["prompt_tokens"] == len(chat["tokens"])
        counts.add(chat["count"])
    assert len(counts) == 3  # tools and enable_thinking change the prompt
    plain = call(port, "POST", "/tokenize", {"messages": messages}).json()
    no_gen = call(port, "POST", "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert no_gen["tokens"] == plain["tokens"][:no_gen["count"]] and no_gen["count"] < plain["count"]
    assert call(port, "GET", "/version").json() == {"version": qwen35.__version__}
    info = call(port, "GET", "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["model_max_length"] == server.serving.max_model_len
    schema = call(port, "GET", "/openapi.json").json()
    assert {"/tokenize", "/detokenize", "/version", "/tokenizer_info"} <= set(schema["paths"])


# ------------------------------------------------------------------------------------------ lm-evaluation-harness
DOCS = [
    {"context": "The capital of France is", "completion": " Paris", "choices": [" Paris", " Rome", " Berlin"],
     "gold": 0},
    {"context": "One plus one is", "completion": " two", "choices": [" two", " three"], "gold": 0},
    {"context": "Water is", "completion": " wet and cold", "choices": [" wet", " dry", " blue", " loud"], "gold": 1},
]


def write_tasks(folder) -> None:
    """Two tasks over a local JSONL file: one loglikelihood per document, and a multiple choice one (one
    loglikelihood per choice, as MMLU / ARC / HellaSwag score)."""
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {folder / "datasets"}
validation_split: validation
doc_to_text: "{{{{context}}}}"
target_delimiter: ""
"""
    (folder / "ll.yaml").write_text(f"""task: qwen35_echo_ll
{common}output_type: loglikelihood
doc_to_target: "{{{{completion}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (folder / "mc.yaml").write_text(f"""task: qwen35_echo_mc
{common}output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def test_lm_eval_local_completions_gets_our_numbers(server, offline, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path)
    before = metric(get_metrics(server.port), "qwen35_http_requests_total", 'method="POST",route="/tokenize",'
                                                                             'status="200"')
    # no tokenizer given: lm-eval finds /tokenizer_info and tokenizes through /tokenize and /detokenize
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["qwen35_echo_ll", "qwen35_echo_mc"], batch_size=2, log_samples=True,
        model_args={"base_url": server.base_url + "/v1/completions", "model": MODEL, "num_concurrent": 1,
                    "max_retries": 1},
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    after = metric(get_metrics(server.port), "qwen35_http_requests_total", 'method="POST",route="/tokenize",'
                                                                            'status="200"')
    assert after > before

    tok = offline.tokenizer

    def ours(context: str, continuation: str) -> tuple[float, bool]:
        ctx = tok.encode(context)
        ids = tok.encode(context + continuation)
        assert ids[:len(ctx)] == ctx  # contexts end without a space: the split is clean
        entries = engine_prompt_logprobs(offline, ids)
        own = [entries[p][ids[p]] for p in range(len(ctx), len(ids))]
        return sum(e.logprob for e in own), all(e.rank == 1 for e in own)

    samples = results["samples"]
    assert [s["doc"] for s in samples["qwen35_echo_ll"]] == DOCS
    for s in samples["qwen35_echo_ll"]:
        (ll, greedy), = s["filtered_resps"]
        want_ll, want_greedy = ours(s["doc"]["context"], s["doc"]["completion"])
        assert ll == pytest.approx(want_ll, abs=1e-3) and greedy == want_greedy
    for s in samples["qwen35_echo_mc"]:
        got = [r[0] for r in s["filtered_resps"]]
        want = [ours(s["doc"]["context"], c)[0] for c in s["doc"]["choices"]]
        assert got == pytest.approx(want, abs=1e-3)
        assert s["acc"] == float(max(range(len(want)), key=want.__getitem__) == s["doc"]["gold"])
    assert "acc,none" in results["results"]["qwen35_echo_mc"]
