"""Weight-only int8: every path equals the dequantise-then-matmul twin; a quantised model stays close."""

from __future__ import annotations

import json

import pytest
import torch

import qwen35
from conftest import TEXT_IDS, text_config
from qwen35.ops.quant import int8_linear, int8_linear_reference, quantize_rows


def test_quantize_rows_round_trip():
    w = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (q.float() * scale[:, None] - w).abs().max(-1).values
    assert (err <= scale / 2 + 1e-7).all()  # rounding error at most half a step


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_paths_equal_reference(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    q, scale = quantize_rows(torch.randn(96, 160, generator=gen))
    x = torch.randn(rows, 160, generator=gen).to(dtype)
    ref = x.double() @ (q.double() * scale.double()[:, None]).T
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    # the VNNI kernel (few rows) also rounds x to int16 per row: at most max|x| / 65534 per element
    w_abs = (q.double().abs() * scale.double()[:, None]).sum(-1)
    act = x.double().abs().amax(-1, keepdim=True) / 65534 * w_abs
    err = (int8_linear(x, q, scale).double() - ref).abs()
    assert (err <= act + tol * 10 + tol * ref.abs()).all()
    torch.testing.assert_close(int8_linear_reference(x, q, scale).double(), ref, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("moe", [False, True])
def test_int8_model_close_to_full_precision_and_cache_consistent(tmp_path, moe):
    from qwen35.engine.direct import DirectRun

    kind = "qwen3_5_moe_text" if moe else "qwen3_5_text"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": kind, **text_config(moe=moe,
                                                      tie_word_embeddings=True)}))
    full = qwen35.load_model(tmp_path, load_format="dummy")
    q8 = qwen35.load_model(tmp_path, load_format="dummy", quantization="int8")
    assert q8.lm_head is not None and q8.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, TEXT_IDS, (1, 50), generator=torch.Generator().manual_seed(1))
    a, b = full(ids), q8(ids)
    assert float((a - b).abs().max()) <= 0.02 * float(a.abs().max())
    # the quantised model through the cache (prefill chunk + decode steps) equals its own one forward
    run = DirectRun(q8, num_seqs=1, max_len=64)
    outs, at = [], 0
    for n in (40, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1):
        outs.append(q8.compute_logits(run.forward({0: ids[0, at:at + n].tolist()})[0]))
        at += n
    torch.testing.assert_close(torch.cat(outs), b[0], rtol=1e-4, atol=1e-4)


def test_unknown_quantization_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quantization='int4'"):
        qwen35.load_model(tmp_path, load_format="dummy", quantization="int4")


def test_llm_and_cli_take_int8(tmp_path, capsys):
    from qwen35.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text",
                                                      **text_config(vocab_size=248320)}))
    llm = qwen35.LLM(str(tmp_path), load_format="dummy", dtype="bfloat16", quantization="int8")
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], qwen35.SamplingParams(max_tokens=4, ignore_eos=True,
                                                                               temperature=0.0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert getattr(llm.model, "quantization", None) == "int8"
    assert main(["generate", str(tmp_path), "Hi", "--load-format", "dummy", "--quantization", "int8",
                 "--max-tokens", "3", "--ignore-eos", "--dtype", "bfloat16"]) == 0
