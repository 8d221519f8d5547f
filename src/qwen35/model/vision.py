"""The vision tower (`model.visual.*`): patch embedding, interpolated learned positions, 2-D rotary,
pre-LayerNorm blocks with bidirectional attention inside each image / video frame (never across them),
and the 2x2 patch merger into the language model's hidden size.

Patch rows arrive in the processor's order: for each image (or temporal patch of a video), merge blocks
of 2x2 patches in raster order of blocks, the 4 patches of a block in raster order. Everything below
(positions, rotary, the merger's grouping of 4 consecutive rows) follows that order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # kernel == stride == the whole patch: the convolution is one matmul per row.
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.head_dim = c.hidden_size // c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seg_lens: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        outs = []
        for qs, ks, vs in zip(q.split(seg_lens), k.split(seg_lens), v.split(seg_lens), strict=True):
            o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
            outs.append(o.transpose(0, 1))
        return self.proj(torch.cat(outs).reshape(N, -1))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary over the full head dim, in fp32. x: [N, heads, d]; cos/sin: [N, d]."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=True)
        if c.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"vision_config.hidden_act={c.hidden_act!r} is not supported")
        self.approximate = "tanh" if c.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x, cos, sin, seg_lens):
        x = x + self.attn(self.norm1(x), cos, sin, seg_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.merged = c.hidden_size * c.spatial_merge_size**2
        self.norm = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, c.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).view(-1, self.merged)  # each merge block's patches are consecutive rows
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.cfg = c
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)
        self.side = int(round(c.num_position_embeddings**0.5))
        if self.side * self.side != c.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings={c.num_position_embeddings} is not a square")

    def _block_order(self, t: torch.Tensor) -> torch.Tensor:
        """[h, w, ...] raster -> [h*w, ...] in merge-block order."""
        m = self.cfg.spatial_merge_size
        h, w = t.shape[:2]
        return t.reshape(h // m, m, w // m, m, *t.shape[2:]).transpose(1, 2).reshape(h * w, *t.shape[2:])

    def _positions(self, grid_thw: list[list[int]], dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Learned position embeddings (bilinear, align_corners) and rotary cos/sin for every patch row."""
        device = self.pos_embed.weight.device
        D = self.cfg.hidden_size
        head_dim = D // self.cfg.num_heads
        quarter = head_dim // 4
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float, device=device)
                                      / (head_dim // 2)))
        table = self.pos_embed.weight.view(1, self.side, self.side, D).permute(0, 3, 1, 2)
        pos, angles = [], []
        for t, h, w in grid_thw:
            grid = F.interpolate(table.float(), size=(h, w), mode="bilinear", align_corners=True)[0]  # [D, h, w]
            pos.append(self._block_order(grid.permute(1, 2, 0)).repeat(t, 1))
            rows = torch.arange(h, device=device)[:, None].expand(h, w)
            cols = torch.arange(w, device=device)[None, :].expand(h, w)
            hw = self._block_order(torch.stack([rows, cols], dim=-1)).float()  # [h*w, 2]
            ang = torch.cat([hw[:, :1] * inv_freq[:quarter], hw[:, 1:] * inv_freq[:quarter]], dim=-1)
            angles.append(ang.repeat(t, 1))
        emb = torch.cat(angles)
        emb = torch.cat([emb, emb], dim=-1)
        return torch.cat(pos).to(dtype), emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [sum t*h*w, C*T*P*P], grid_thw [n, 3] -> merged features [sum t*h*w/4, out_hidden]."""
        grids = [[int(v) for v in g] for g in grid_thw.tolist()]
        m = self.cfg.spatial_merge_size
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.dim() != 2 or pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; grid_thw {grids} needs "
                             f"[{expected}, {3 * self.cfg.temporal_patch_size * self.cfg.patch_size ** 2}]")
        if any(h % m or w % m for _, h, w in grids):
            raise ValueError(f"grid_thw {grids}: h and w must be multiples of spatial_merge_size={m}")
        x = self.patch_embed(pixel_values)
        pos, cos, sin = self._positions(grids, x.dtype)
        x = x + pos
        seg_lens = [h * w for t, h, w in grids for _ in range(t)]  # attention stays inside one frame
        for block in self.blocks:
            x = block(x, cos, sin, seg_lens)
        return self.merger(x)
