"""Shared test helpers: tiny random Qwen3.5 checkpoints saved by transformers (the numerical oracle)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference"

TINY_TEXT = dict(
    vocab_size=131, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                         mrope_section=[2, 1, 1], mrope_interleaved=True),
)
TINY_MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, shared_expert_intermediate_size=20)
# Vision token ids inside the tiny vocabulary (the real ones are 248053..248057).
TEXT_IDS = 120  # random text ids stay below the tiny vocabulary's vision token ids
TINY_TOKEN_IDS = dict(vision_start_token_id=120, vision_end_token_id=121, image_token_id=122, video_token_id=123)
TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=4, temporal_patch_size=2,
                   spatial_merge_size=2, num_position_embeddings=16)


def text_config(moe: bool = False, **overrides) -> dict:
    d = dict(TINY_TEXT)
    if moe:
        d.update(TINY_MOE)
    else:
        d["intermediate_size"] = 40
    d.update(overrides)
    return d


@torch.no_grad()
def make_weights_bite(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-initialise so that every part matters: O(1) activations, non-trivial norm weights, and slow GDN
    decay (small A_log, negative dt_bias) so early tokens still shape the state at the end."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.empty(p.shape).uniform_(-4.0, -2.5, generator=gen))
        elif leaf == "dt_bias":
            p.copy_(torch.empty(p.shape).uniform_(-2.5, -1.5, generator=gen))
        elif "norm" in name and p.dim() == 1:
            base = 1.0 if name.endswith("linear_attn.norm.weight") or "visual" in name else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
        elif leaf == "bias":
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p.shape[-1] if p.dim() >= 2 else p.numel()
            if "conv1d" in name:
                fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def make_hf_model(kind: str = "cg", moe: bool = False, tied: bool = False, vision: bool = True, seed: int = 0,
                  **text_overrides):
    """A random transformers Qwen3.5 model. kind: "cg" (ForConditionalGeneration) or "causal" (ForCausalLM)."""
    import transformers as tf

    torch.manual_seed(seed)
    tc = text_config(moe, tie_word_embeddings=tied, **text_overrides)
    if kind == "cg":
        vc = dict(TINY_VISION, out_hidden_size=tc["hidden_size"])
        cls_cfg = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
        cfg = cls_cfg(text_config=tc, vision_config=vc, tie_word_embeddings=tied, **TINY_TOKEN_IDS)
        cls = tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration
    else:
        cls_cfg = tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig
        cfg = cls_cfg(**tc)
        cls = tf.Qwen3_5MoeForCausalLM if moe else tf.Qwen3_5ForCausalLM
    model = cls(cfg).eval()
    make_weights_bite(model, seed)
    if tied:
        model.tie_weights()
    return model


def save_hf(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path


def hf_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask).logits


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    scale = max(1.0, float(ref.abs().max()))
    diff = float((ours.float() - ref.float()).abs().max())
    assert diff <= rel * scale, f"max |diff| {diff:.3e} > {rel:g} * {scale:.3g}"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.exists():
        pytest.skip("../shared/reference is not available")
    return REFERENCE
