"""The multi-token-prediction head (one extra full-attention layer), used as a speculative drafter.

Draft step (FACTS.md): x = fc(cat([norm_e(embed(next_token)), norm_h(h)])), where h is the model's final
hidden state (after its final norm); then the layer (its own KV pool in the cache, same positions),
`mtp.norm`, and the model's lm_head.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35.config import TextConfig
from qwen35.model.cache import ForwardBatch
from qwen35.model.decoder import DecoderLayer
from qwen35.model.norm import RMSNorm
from qwen35.model.rope import MRotaryEmbedding
from qwen35.ops.linear import Linear
from qwen35.parallel import TensorParallel


class MTPHead(nn.Module):
    def __init__(self, cfg: TextConfig, tp: TensorParallel | None = None):
        super().__init__()
        H = cfg.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(H, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(H, cfg.rms_norm_eps)
        self.fc = Linear(2 * H, H)
        # Its KV lives after the model's own layers in the cache (HybridCache(extra_attention_layers=1)).
        self.layers = nn.ModuleList([DecoderLayer(cfg, "full_attention", cfg.is_moe, cfg.num_hidden_layers, tp)])
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(cfg)

    def forward(self, token_embeds: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """token_embeds: embeddings of the next tokens [N, H]; hidden: the model's final hidden states at the
        same positions [N, H] -> the draft hidden state [N, H] (apply the model's lm_head for logits)."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(token_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        rope = self.rotary(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, batch)
        return self.norm(x)
