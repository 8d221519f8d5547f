"""The decoder layer and the text model (embeddings, layer stack, final norm)."""

from __future__ import annotations

import torch
from torch import nn

from qwen35.config import TextConfig
from qwen35.model.attention import GatedAttention
from qwen35.model.cache import ForwardBatch
from qwen35.model.deltanet import GatedDeltaNet
from qwen35.model.mlp import SparseMoE, SwiGLU
from qwen35.model.norm import RMSNorm
from qwen35.model.rope import MRotaryEmbedding


class DecoderLayer(nn.Module):
    """x += mixer(norm1(x)); x += ffn(norm2(x)). `cache_index` names this layer's pools in the cache."""

    def __init__(self, cfg: TextConfig, layer_type: str, moe: bool, cache_index: int):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, cache_index)
        else:
            self.self_attn = GatedAttention(cfg, cache_index)
        self.mlp = SparseMoE(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope, batch: ForwardBatch) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, batch)
        else:
            h = self.self_attn(h, rope, batch)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, t, cfg.layer_is_moe(i), i) for i, t in enumerate(cfg.layer_types))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(cfg)

    def forward(self, embeds: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """embeds: [N, H] flat new tokens -> final-normed hidden states [N, H]."""
        rope = self.rotary(batch.positions, embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, rope, batch)
        return self.norm(x)
