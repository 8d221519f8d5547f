"""Greedy generation through the engine equals transformers' greedy generation on the same checkpoint."""

from __future__ import annotations

import math

import pytest
import test_engine_support  # noqa: F401  (one torch thread)
import torch

import qwen35

transformers = pytest.importorskip("transformers")

MAX_NEW = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.Qwen3_5TextConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=None, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [1, 1, 2], "mrope_interleaved": True})
    torch.manual_seed(0)
    hf = transformers.Qwen3_5ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("A_log"):
                p.fill_(-3.0)  # slow decay: early tokens still matter
            elif name.endswith("dt_bias"):
                p.fill_(-2.0)
            elif "norm" not in name and p.dim() >= 2:
                p.copy_(torch.randn(p.shape) / math.sqrt(1 if "embed" in name else p.shape[-1]))
    folder = tmp_path_factory.mktemp("hf") / "ckpt"
    hf.save_pretrained(folder)
    return hf, folder


def test_greedy_equals_transformers(checkpoint):
    hf, folder = checkpoint
    llm = qwen35.LLM(str(folder), skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24,
                     max_num_batched_tokens=32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in (1, 6, 45, 150)]
    outs = llm.generate(prompts, qwen35.SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ours = out.outputs[0].token_ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW,
                              min_new_tokens=MAX_NEW)[0, len(prompt):].tolist()
        if ours != ref:  # allowed only at a near tie of the two best logits
            k = next(i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + ref[:k]])).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            assert float(top2[0] - top2[1]) < 1e-4, f"prompt of {len(prompt)}: diverged at {k}"
