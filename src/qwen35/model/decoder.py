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
from qwen35.parallel import TensorParallel


class DecoderLayer(nn.Module):
    """x += mixer(norm1(x)); x += ffn(norm2(x)). `cache_index` names this layer's pools in the cache."""

    def __init__(self, cfg: TextConfig, layer_type: str, moe: bool, cache_index: int,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, cache_index, tp)
        else:
            self.self_attn = GatedAttention(cfg, cache_index, tp)
        self.mlp = SparseMoE(cfg, tp) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size, tp)
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


class VocabEmbedding(nn.Embedding):
    """The token embedding; under tensor parallelism rank r holds rows [r*V/N, (r+1)*V/N), looks up the tokens
    it holds, and the ranks' rows are summed (each token's row is nonzero on one rank only: exact)."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel | None = None):
        tp = tp if tp is not None and tp.size > 1 else None
        vocab_range = tp.part(vocab_size) if tp is not None else (0, vocab_size)
        super().__init__(vocab_range[1] - vocab_range[0], hidden)
        self.tp, self.vocab_range = tp, vocab_range

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return super().forward(ids)
        a, b = self.vocab_range
        mine = (ids >= a) & (ids < b)
        rows = super().forward(torch.where(mine, ids - a, torch.zeros_like(ids)))
        return self.tp.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, tp: TensorParallel | None = None):
        """`cfg`: this rank's share under tensor parallelism (parallel/layout.py)."""
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, t, cfg.layer_is_moe(i), i, tp) for i, t in enumerate(cfg.layer_types))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(cfg)

    def forward(self, embeds: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """embeds: [N, H] flat new tokens -> final-normed hidden states [N, H]."""
        rope = self.rotary(batch.positions, embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, rope, batch)
        return self.norm(x)
