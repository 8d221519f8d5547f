"""Bytes read per decoded token: the limit a memory-bound decode cannot beat.

One decode step of a batch of B sequences reads
  * the weights the step touches once: every dense weight, the head (for a tied model the embedding table, read
    whole by the head), and for an MoE the experts that at least one of the B tokens routes to (expected
    E * (1 - (1 - k/E)^B) per layer with random routing); the embedding table itself is not read (one row per
    token);
  * per sequence: the KV of every full-attention layer over the whole context, and the GDN state of every
    linear-attention layer (fp32, read and written back; plus the small conv window).
Bytes per token = that / B; tok/s limit = memory bandwidth / bytes per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from qwen35.config import ModelConfig


@dataclass
class DecodeBytes:
    context: int
    batch: int
    weights: float  # bytes of weights read per step (shared by the batch)
    kv: float  # per sequence
    state: float  # per sequence (read + write)
    per_token: float  # (weights + batch * (kv + state)) / batch

    def as_dict(self) -> dict:
        return asdict(self)


def _weight_groups(cfg: ModelConfig, fmt: str) -> tuple[float, float, int, int]:
    """(bytes of always-read weights incl. the head, bytes of ALL routed experts, experts per layer, top-k)."""
    import torch

    from qwen35.model.qwen35 import Qwen35Model

    t = cfg.text
    with torch.device("meta"):
        model = Qwen35Model(cfg, with_mtp=False, with_vision=False)
    keep = set()
    if fmt == "fp8" and cfg.quantization:
        for m in cfg.quantization.get("modules_to_not_convert") or []:
            keep.add(m.replace("model.language_model.", "model.") + ".weight")
    dense = routed = 0.0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight" and not t.tie_word_embeddings:
            continue  # one row per token
        n = p.numel()
        if fmt == "bf16" or p.dim() < 2 or name in keep or (not keep and name.endswith(
                ("embed_tokens.weight", "lm_head.weight", "conv1d.weight", "in_proj_a.weight", "in_proj_b.weight",
                 "mlp.gate.weight", "shared_expert_gate.weight"))):
            b = 2.0 * n
        elif fmt == "fp8":
            rows, cols = p.shape[-2], p.shape[-1]
            b = n + 4.0 * (n // (rows * cols)) * math.ceil(rows / 128) * math.ceil(cols / 128)
        else:
            raise ValueError(f"weight format {fmt!r}: bf16 or fp8")
        if ".experts." in name:
            routed += b
        else:
            dense += b
    return dense, routed, t.num_experts, t.num_experts_per_tok


def decode_bytes(cfg: ModelConfig, context: int, batch: int = 1, fmt: str = "bf16",
                 kv_dtype_bytes: int = 2) -> DecodeBytes:
    t = cfg.text
    dense, routed, E, k = _weight_groups(cfg, fmt)
    if E:
        touched = E * (1 - (1 - k / E) ** batch)
        weights = dense + routed * touched / E
    else:
        weights = dense
    kv_tok = len(t.attention_layers) * 2 * t.num_key_value_heads * t.head_dim * kv_dtype_bytes
    kv = kv_tok * (context + 1)  # the context, plus the new token's KV written
    state = len(t.linear_layers) * (
        2 * 4 * t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim  # fp32, read + write
        + 2 * 2 * t.conv_dim * (t.linear_conv_kernel_dim - 1))  # conv window, model dtype, read + write
    return DecodeBytes(context, batch, weights, kv, state, (weights + batch * (kv + state)) / batch)


def screened_head_saving(cfg: ModelConfig) -> float:
    """Bytes a greedy bf16 step of qwen35 does not read thanks to its head screen (qwen35/ops/head_screen.py):
    it reads the head as int8 (1 byte per weight) plus three fp32 numbers per vocabulary row (scale and two bound
    coefficients) instead of bf16, and a few candidate rows in bf16 (not counted: ~10-30 rows of 2 KB)."""
    t = cfg.text
    V, K = t.vocab_size, t.hidden_size
    return 2.0 * V * K - (1.0 * V * K + 12.0 * V)


def twin(cfg: ModelConfig) -> ModelConfig:
    from qwen35.model_info import full_attention_twin

    return full_attention_twin(cfg)


def claim_table(cfg: ModelConfig, contexts=(32768, 262144), batches=(1, 8, 64, None), fmt: str = "fp8") -> list[dict]:
    """Bytes per decoded token of a model and of its all-full-attention twin, and their ratio (the twin's decode
    time over the hybrid's, when both are memory bound). batch None: the many-sequence limit where the weights
    are shared by so many tokens that only KV + state count."""
    tw = twin(cfg)
    rows = []
    for c in contexts:
        for b in batches:
            h = decode_bytes(cfg, c, b or 1, fmt)
            w = decode_bytes(tw, c, b or 1, fmt)
            if b is None:
                hb, wb = h.kv + h.state, w.kv + w.state
            else:
                hb, wb = h.per_token, w.per_token
            rows.append({"context": c, "batch": b, "hybrid_bytes": hb, "twin_bytes": wb, "ratio": wb / hb,
                         "hybrid_kv": h.kv, "hybrid_state": h.state, "twin_kv": w.kv,
                         "weights_per_token": None if b is None else h.weights / b})
    return rows


def implied_comparator(cfg: ModelConfig, claims=((32768, 8.6), (262144, 19.0)), fmt: str = "fp8") -> dict:
    """What a memory-bound comparator would have to read for the published ratios to be a bytes ratio.

    Batch 1: hybrid bytes H(c) = W + K*c + S; comparator bytes W_c + K_c*c. Two claims (c1, r1), (c2, r2) give two
    linear equations in W_c, K_c. Many-sequence limit: K_c = r * (K*c + S) / c for each claim separately (a pure
    KV model must give the same K_c twice)."""
    (c1, r1), (c2, r2) = claims
    h1, h2 = decode_bytes(cfg, c1, 1, fmt), decode_bytes(cfg, c2, 1, fmt)
    t1, t2 = r1 * h1.per_token, r2 * h2.per_token
    kc = (t2 - t1) / (c2 - c1)
    wc = t1 - kc * c1
    kv_tok = h1.kv / (c1 + 1)
    return {
        "hybrid_weights_read": h1.weights, "hybrid_kv_per_token": kv_tok, "hybrid_state": h1.state,
        "batch1_comparator_weights": wc, "batch1_comparator_kv_per_token": kc,
        "limit_comparator_kv_per_token": [r * (h.kv + h.state) / (c + 1)
                                          for (c, r), h in zip(claims, (h1, h2), strict=True)],
    }
