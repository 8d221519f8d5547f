"""Helpers for the engine tests: tiny random models whose outputs depend on the whole context.

(Named test_engine_* to sit with the engine's tests; it holds no tests itself.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import qwen35

# Two cores shared by several developers: one thread avoids the spin-wait contention that makes tiny
# matmuls 1000x slower with two threads on a busy machine.
torch.set_num_threads(1)

TINY = {
    "model_type": "qwen3_5_text", "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4, "full_attention_interval": 2, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                        "mrope_section": [1, 1, 2], "mrope_interleaved": True},
}


def write_config(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY)
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@torch.no_grad()
def make_model(folder: Path, seed: int = 0):
    """A tiny model with O(1) activations (weights ~ 1/sqrt(fan_in)) and slow GDN decay (A_log=-3,
    dt_bias=-2) so that early tokens still matter hundreds of tokens later."""
    model = qwen35.load_model(folder, load_format="dummy", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.fill_(-3.0)
        elif name.endswith("dt_bias"):
            p.fill_(-2.0)
        elif "norm" in name:
            continue
        elif p.dim() >= 2:
            fan_in = p.shape[-1] if "embed" not in name else 1
            if "conv1d" in name:
                fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


def engine_llm(model, **kw) -> qwen35.LLM:
    kw.setdefault("skip_tokenizer_init", True)
    return qwen35.LLM(model, **kw)


def random_prompts(lengths, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
