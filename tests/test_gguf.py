"""GGUF files made by llama.cpp's own converter (`convert_hf_to_gguf.py` of the llama-cpp-python 0.3.36 sdist,
pure Python: .ci/run fetches it): every converter transform undone, so fp32 equals transformers; bad files refused
by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen35
from conftest import TEXT_IDS, assert_logits_close, hf_logits, make_hf_model, save_hf
from qwen35.config import ConfigError
from qwen35.weights import CheckpointError

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

IDS = torch.randint(0, TEXT_IDS, (1, 70), generator=torch.Generator().manual_seed(0))


def _converter() -> Path | None:
    from bench.models import find_converter

    return find_converter(os.environ.get("LLAMA_CPP_CONVERTER"))


def convert(folder: Path, outtype: str) -> Path:
    conv = _converter()
    if conv is None:
        pytest.skip("llama.cpp's converter not found (set LLAMA_CPP_CONVERTER to the sdist's vendor/llama.cpp)")
    out = folder / f"model-{outtype}.gguf"
    env = dict(os.environ, PYTHONPATH=str(conv / "gguf-py"))
    r = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
                        "--no-mtp", "--outfile", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module", params=["dense", "moe"])
def converted(request, tmp_path_factory):
    """(transformers model, its folder, the converter's F32 GGUF of it): key heads != value heads (2 / 4), so
    the converter's value-head reorder bites; the real vocabulary size (the converter needs the tokenizer)."""
    from bench.models import write_tokenizer

    moe = request.param == "moe"
    hf = make_hf_model("causal", moe=moe, vocab_size=248320)
    folder = save_hf(hf, tmp_path_factory.mktemp(f"gguf-{request.param}") / "hf")
    write_tokenizer(folder)
    return hf, folder, convert(folder, "f32")


def test_f32_gguf_equals_transformers(converted):
    hf, _, path = converted
    ours = qwen35.load_model(path, dtype=torch.float32)
    assert any("GGUF" in line and "F32" in line for line in ours.load_report)
    t = ours.config.text
    assert t.linear_num_key_heads != t.linear_num_value_heads and t.is_moe == ("moe" in hf.config.model_type)
    assert_logits_close(ours(IDS), hf_logits(hf, IDS), rel=1e-4)
    # A_log comes back through log(-ssm_a), ssm_a = -exp(A_log): a float32 round trip
    torch.testing.assert_close(ours.model.layers[0].linear_attn.A_log, hf.model.layers[0].linear_attn.A_log,
                               rtol=1e-6, atol=1e-6)


def test_engine_on_a_gguf(converted):
    """`LLM("x.gguf")` with the tokenizer beside it: greedy tokens equal the model's own greedy continuation."""
    _, _, path = converted
    llm = qwen35.LLM(str(path), dtype="float32", kv_cache_memory_bytes=1 << 24)
    assert llm.tokenizer is not None
    prompt = IDS[0, :20].tolist()
    out = llm.generate([{"prompt_token_ids": prompt}], qwen35.SamplingParams(temperature=0, max_tokens=5,
                                                                           ignore_eos=True))
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(llm.model(torch.tensor([seq]))[0, -1].argmax()))
    assert out[0].outputs[0].token_ids == seq[len(prompt):]


def test_q8_0_gguf_widens_to_the_same_weights(converted, tmp_path):
    hf, folder, f32 = converted
    if "moe" in hf.config.model_type:
        pytest.skip("one quantised type is enough here (the widening is gguf's)")
    q8 = convert(folder, "q8_0")
    exact = dict(qwen35.load_model(f32, dtype=torch.float32).named_parameters())
    # each weight within Q8_0's rounding of the exact one (a wrong permutation would be off by O(1)); what the
    # converter keeps in F32 (norms, A_log, dt_bias, conv) comes back bit for bit
    for name, p in qwen35.load_model(q8, dtype=torch.float32).named_parameters():
        ref = exact[name]
        if p.dim() == 1 or "conv1d" in name:
            assert torch.equal(p, ref), name
        else:
            assert float((p - ref).abs().max()) <= float(ref.abs().max()) / 127 * 0.51, name


def test_cli_info_reads_a_gguf(converted, capsys):
    from qwen35.cli import main

    _, _, path = converted
    assert main(["info", str(path), "--context", "4096"]) == 0
    text = capsys.readouterr().out
    assert "params_total" in text and "GGUF file" in text and "  F32" in text
    assert main(["info", str(path), "--json"]) == 0
    by_type = json.loads(capsys.readouterr().out)["gguf_bytes_by_type"]
    assert by_type["F32"]["bytes"] == 4 * by_type["F32"]["elements"]
    assert sum(r["bytes"] for r in by_type.values()) <= path.stat().st_size


def test_cli_generate_on_a_gguf(converted, capsys):
    """`qwen35 generate x.gguf` (auto and --load-format gguf): the engine's greedy text, the same both ways."""
    from qwen35.cli import main

    _, _, path = converted
    args = ["generate", str(path), "Hello there", "--max-tokens", "5", "--temperature", "0", "--ignore-eos",
            "--dtype", "float32"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.out.strip() and "length limit" in first.err
    assert main([*args, "--load-format", "gguf"]) == 0
    assert capsys.readouterr().out == first.out
    assert main(["generate", str(path), "Hi", "--load-format", "safetensors", "--max-tokens", "2"]) != 0
    assert str(path) in capsys.readouterr().err


def test_bad_gguf_files_are_named(converted, tmp_path):
    _, _, path = converted
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(CheckpointError, match="junk.gguf: not a readable GGUF file"):
        qwen35.load_model(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        qwen35.load_model(cut)
    split = tmp_path / "model-00001-of-00002.gguf"
    shutil.copy(path, split)
    with pytest.raises(CheckpointError, match="missing model-00002-of-00002.gguf"):
        qwen35.load_model(split)


def test_unknown_architecture_is_refused(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="general.architecture='llama' is not a Qwen3.5 model"):
        qwen35.load_model(path)


SAMPLES = ["Hello world", "  indented\n\tcode()  ", "数字 123,456.78 and émojis 🎉🎉", "<|im_start|>user\nhi<|im_end|>",
           "<think>\nreason\n</think>\n\nanswer", "<tool_call>{\"a\": 1}</tool_call>"]


def test_a_gguf_alone_uses_the_builtin_vocabulary_only_if_it_is_the_same(converted, tmp_path):
    from qwen35.weights.gguf import check_builtin_vocabulary, gguf_tokenizer

    _, _, path = converted
    alone = tmp_path / "alone.gguf"
    shutil.copy(path, alone)  # no tokenizer.json beside it
    llm = qwen35.LLM(str(alone), dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert llm.model.gguf_vocabulary[0] == 248077  # the file's own tokens (its [PAD] fillers left out)
    assert llm.tokenizer.encode("Hello world") == qwen35.load_tokenizer(None).encode("Hello world")
    with pytest.raises(CheckpointError, match="differs from the built-in Qwen3.5 vocabulary"):
        check_builtin_vocabulary(llm.tokenizer, (248077, "0" * 40), str(alone))
    # another vocabulary (a fine-tune's): the tokenizer is built from the file's tokenizer.ggml.* metadata
    other = gguf_tokenizer(alone, digest=(248077, "0" * 40))
    assert other.name_or_path == str(alone)


def test_the_tokenizer_built_from_gguf_metadata_gives_the_builtin_ids(converted):
    """tokens, merges and token types of the converter's file make a tokenizer with the very ids of the built-in
    Qwen3.5 vocabulary, special tokens and chat markup included; the file's chat template and EOS come along."""
    from qwen35.tokenizer import tokenizer_from_gguf
    from qwen35.weights.gguf_file import GGUFFile

    _, _, path = converted
    fields = GGUFFile(path).fields
    ours, builtin = tokenizer_from_gguf(fields, str(path)), qwen35.load_tokenizer(None)
    for text in SAMPLES:
        assert ours.encode(text) == builtin.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.eos_token_ids[0] == fields["tokenizer.ggml.eos_token_id"]
    assert ours.chat_template == fields.get("tokenizer.chat_template")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='llama-bpe' is not the Qwen pre-tokenizer"):
        tokenizer_from_gguf({**fields, "tokenizer.ggml.pre": "llama-bpe"}, "x.gguf")
