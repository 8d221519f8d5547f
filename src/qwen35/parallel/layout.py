"""The one sharding layout of Qwen3.5 over N tensor-parallel ranks (fixed by the architecture, never inferred
from a tensor's shape).

  * embedding and head: vocab-parallel, rank r holds rows [r*V/N, (r+1)*V/N);
  * gated attention: by (query, gate) head pairs, q_proj rows of query heads [r*Hq/N, ...), k_proj / v_proj rows
    of the KV heads those use ([r*Hkv/N, ...) when N divides Hkv; one replicated head each when Hkv divides N),
    o_proj row-parallel (its input columns of the rank's query heads);
  * Gated DeltaNet: by key-head group, key heads [r*Hk/N, ...) (their q and k rows and conv channels) and the
    value heads they serve, [r*Hv/N, ...) (v, z, a, b rows, conv channels, A_log, dt_bias, state), out_proj
    row-parallel;
  * dense MLP and shared expert: gate / up rows of the inner dimension [r*I/N, ...), down_proj its columns;
  * routed experts: with expert parallelism the rank's experts [r*E/N, ...) whole, else every expert's inner
    dimension split as the MLP's; the router and the shared expert's gate are replicated;
  * norms, the MTP layer's fc and the vision tower: replicated.
Row-parallel outputs are summed over the ranks once per mixer and once per FFN (`TensorParallel.all_reduce`).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qwen35.config import TextConfig
from qwen35.parallel.state import TensorParallel


def _constraints(cfg: TextConfig, expert_parallel: bool) -> list[tuple[str, int, str]]:
    """(what, count, how N must relate to it): 'divides' (N divides count) or 'kv' (N divides it or it divides N)."""
    out = [("num_attention_heads", cfg.num_attention_heads, "divides"),
           ("num_key_value_heads", cfg.num_key_value_heads, "kv"),
           ("linear_num_key_heads", cfg.linear_num_key_heads, "divides"),
           ("vocab_size", cfg.vocab_size, "divides")]
    if any(not cfg.layer_is_moe(i) for i in range(cfg.num_hidden_layers)):
        out.append(("intermediate_size", cfg.intermediate_size, "divides"))
    if cfg.is_moe:
        out.append(("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size, "divides"))
        if expert_parallel:
            out.append(("num_experts", cfg.num_experts, "divides"))
        else:
            out.append(("moe_intermediate_size", cfg.moe_intermediate_size, "divides"))
    return out


def _fits(n: int, count: int, how: str) -> bool:
    return count % n == 0 or (how == "kv" and n % count == 0)


def check_shardable(cfg: TextConfig, size: int, expert_parallel: bool = False) -> None:
    """Raise ValueError naming the count N does not divide, and the sizes that work."""
    cons = _constraints(cfg, expert_parallel)
    bad = [(what, count) for what, count, how in cons if not _fits(size, count, how)]
    if not bad:
        kv = cfg.num_key_value_heads
        if size > kv and (cfg.num_attention_heads // size) and (cfg.num_attention_heads // kv) % (
                cfg.num_attention_heads // size):
            bad.append(("num_attention_heads per KV head", cfg.num_attention_heads // kv))
    if bad:
        ok = [n for n in range(1, 65) if all(_fits(n, c, h) for _, c, h in cons)]
        what = ", ".join(f"{w}={c}" for w, c in bad)
        raise ValueError(f"tensor_parallel_size={size} does not divide {what}"
                         f"{' (with expert parallelism)' if expert_parallel and cfg.is_moe else ''}; "
                         f"sizes that work for this model: {ok}")


def local_text_config(cfg: TextConfig, tp: TensorParallel) -> TextConfig:
    """The text config of one rank's share: its heads and inner sizes (the vocabulary, the router's experts and
    everything else as in the model)."""
    check_shardable(cfg, tp.size, tp.expert_parallel)
    n = tp.size
    kv = cfg.num_key_value_heads
    changes = dict(num_attention_heads=cfg.num_attention_heads // n, num_key_value_heads=max(1, kv // n),
                   linear_num_key_heads=cfg.linear_num_key_heads // n,
                   linear_num_value_heads=cfg.linear_num_value_heads // n)
    if any(not cfg.layer_is_moe(i) for i in range(cfg.num_hidden_layers)):
        changes["intermediate_size"] = cfg.intermediate_size // n
    if cfg.is_moe:
        changes["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size // n
        if not tp.expert_parallel:
            changes["moe_intermediate_size"] = cfg.moe_intermediate_size // n
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------- checkpoint slices
_REPLICATED = re.compile(r"(norm\.weight|_norm\.weight|layernorm\.weight|mlp\.gate\.weight|shared_expert_gate\.weight"
                         r"|mtp\.fc\.weight)$")


def _weight_name(name: str) -> str:
    """The weight a quantised module's stored tensor belongs to: `x.qweight` / `x.scale` -> `x.weight`,
    `experts.gate_up_proj_qweight` -> `experts.gate_up_proj`."""
    for suffix in (".qweight", ".scale"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    for suffix in ("_qweight", "_scale"):
        if name.endswith(suffix) and "experts." in name:
            return name[: -len(suffix)]
    return name


class Sharder:
    """Cuts a full (checkpoint) tensor of one of our parameters into this rank's share."""

    def __init__(self, cfg: TextConfig, tp: TensorParallel):
        check_shardable(cfg, tp.size, tp.expert_parallel)
        self.cfg, self.tp = cfg, tp

    def _heads(self, count: int, width: int) -> slice:
        a, b = self.tp.part(count)
        return slice(a * width, b * width)

    def _kv(self) -> slice:
        cfg, tp = self.cfg, self.tp
        D, kv = cfg.head_dim, cfg.num_key_value_heads
        if kv >= tp.size:
            return self._heads(kv, D)
        h = tp.rank * kv // tp.size  # the KV head this rank's query heads use
        return slice(h * D, (h + 1) * D)

    def _gdn_channels(self) -> list[slice]:
        cfg = self.cfg
        key_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
        q = self._heads(cfg.linear_num_key_heads, cfg.linear_key_head_dim)
        v = self._heads(cfg.linear_num_value_heads, cfg.linear_value_head_dim)
        return [q, slice(key_dim + q.start, key_dim + q.stop), slice(2 * key_dim + v.start, 2 * key_dim + v.stop)]

    def cuts(self, name: str) -> tuple[int, list[slice]] | None:
        """(dimension, the slices of it this rank keeps, concatenated in order) for parameter `name` (the
        expert dimension of fused experts excluded: see `expert_index`); None: replicated."""
        cfg = self.cfg
        if name.startswith("visual.") or _REPLICATED.search(name):
            return None
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, [self._heads(cfg.vocab_size, 1)]
        leaf = name.rsplit(".", 2)
        tail = ".".join(leaf[-2:])
        D = cfg.head_dim
        if tail == "q_proj.weight":
            return 0, [self._heads(cfg.num_attention_heads, 2 * D)]
        if tail in ("k_proj.weight", "v_proj.weight"):
            return 0, [self._kv()]
        if tail == "o_proj.weight":
            return 1, [self._heads(cfg.num_attention_heads, D)]
        if tail in ("in_proj_qkv.weight", "conv1d.weight"):
            return 0, self._gdn_channels()
        if tail == "in_proj_z.weight":
            return 0, [self._heads(cfg.linear_num_value_heads, cfg.linear_value_head_dim)]
        if tail in ("in_proj_b.weight", "in_proj_a.weight") or name.endswith(("dt_bias", "A_log")):
            return 0, [self._heads(cfg.linear_num_value_heads, 1)]
        if tail == "out_proj.weight":
            return 1, [self._heads(cfg.linear_num_value_heads, cfg.linear_value_head_dim)]
        inner = cfg.shared_expert_intermediate_size if ".shared_expert." in name else cfg.intermediate_size
        if tail in ("gate_proj.weight", "up_proj.weight"):
            return 0, [self._heads(inner, 1)]
        if tail == "down_proj.weight":
            return 1, [self._heads(inner, 1)]
        if name.endswith("experts.gate_up_proj"):  # [2I, H] per expert: gate rows, then up rows
            if self.tp.expert_parallel:
                return None
            inner_e = cfg.moe_intermediate_size
            g = self._heads(inner_e, 1)
            return 0, [g, slice(inner_e + g.start, inner_e + g.stop)]
        if name.endswith("experts.down_proj"):  # [H, I] per expert
            return None if self.tp.expert_parallel else (1, [self._heads(cfg.moe_intermediate_size, 1)])
        raise ValueError(f"no sharding rule for parameter {name!r}")

    def block_cuts(self, name: str, block: int = 1) -> tuple[int, list[slice]] | None:
        """`cuts` of the weight behind `name`, counted in `block`-wide blocks (a block-scaled format's scale
        tensor: each 128 x 128 tile has one scale, so a share must be whole tiles). Names of quantised storage
        (`q_proj.qweight`, `q_proj.scale`, `experts.gate_up_proj_qweight`) are cut as their weight."""
        base = _weight_name(name)
        cut = self.cuts(base)
        if cut is None or block == 1:
            return cut
        dim, slices = cut
        bad = [s for s in slices if s.start % block or s.stop % block]
        if bad:
            raise ValueError(f"{base}: tensor parallelism over {block}x{block}-block weights needs shares of whole "
                             f"blocks, but rank {self.tp.rank} of {self.tp.size} holds "
                             f"{', '.join(f'[{s.start}, {s.stop})' for s in bad)} along dimension {dim}")
        return dim, [slice(s.start // block, s.stop // block) for s in slices]

    def expert_index(self, name: str, expert: int) -> int | None:
        """Where global expert `expert` of fused-experts parameter `name` goes on this rank (None: not here)."""
        if not self.tp.expert_parallel:
            return expert
        a, b = self.tp.part(self.cfg.num_experts)
        return expert - a if a <= expert < b else None

    def piece(self, name: str, full: torch.Tensor, part: int | None = None, block: int = 1) -> torch.Tensor:
        """This rank's share of `full`, the whole of parameter `name` (one expert's, for fused experts; only
        its gate or up half when `part` is 0 or 1); `block`: `full` is a block-scaled weight's scales."""
        cut = self.block_cuts(name, block)
        if cut is None:
            return full
        dim, slices = cut
        if part is not None and _weight_name(name).endswith("experts.gate_up_proj"):  # a per-expert gate or up
            inner = -(-self.cfg.moe_intermediate_size // block)
            slices = [slice(s.start - part * inner, s.stop - part * inner) for s in slices
                      if part * inner <= s.start < (part + 1) * inner]
        pieces = [full.narrow(dim, s.start, s.stop - s.start) for s in slices]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
