"""The one interface every compressed weight format implements, and the modules that layers call with it.

A `WeightFormat` says how a weight [N, K] (or a stack of experts' weights [E, N, K]) is stored as a few
tensors (its `fields`), how to widen it (`dequantize`: the obviously-correct twin), how to multiply by it
fast (`linear`: the compiled kernels where they apply, the twin elsewhere), how to fuse several along their
rows (`concat`: q|k|v, gate|up) and, optionally, how to run a MoE block's routed experts in one kernel.
`QuantLinear` and `QuantExperts` hold those tensors as buffers (so `.to()`, huge pages and state dicts see
them) and are what the model's layers become when quantised, whatever the format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.ops.experts import ExpertDispatch
from qwen35.ops.hugepages import advise_hugepages

Tensors = dict[str, torch.Tensor]


def concat_rows(parts: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weight rows of several parts [N_i, ...] fused into one buffer on huge pages (decode streams it), and each
    part's rows as a view of it: what every format's `concat` does with its row-indexed field."""
    sizes = [t.shape[0] for t in parts]
    fused = torch.empty(sum(sizes), *parts[0].shape[1:], dtype=parts[0].dtype, device=parts[0].device)
    fused = torch.cat(parts, out=advise_hugepages(fused))
    return fused, list(fused.split(sizes))


def kernel_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x as contiguous rows [M, K] where the compiled CPU kernels apply (bf16 on the CPU, a 2-D weight, at least
    one row), else None (the format's twin then runs)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows > 0 and x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dim() == 2:
        return x.reshape(rows, x.shape[-1]).contiguous()
    return None


class WeightFormat:
    """A storage format for linear weights. Stateless: every method takes the format's tensors."""

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]  # the first one holds the weight rows (its dim -2 is N)
    shared_fields: ClassVar[tuple[str, ...]] = ()  # not stacked per expert (the same for every expert)

    @classmethod
    def quantize(cls, w: torch.Tensor, row_parts: list[int] | None = None) -> Tensors:
        """w [..., N, K] -> the format's tensors. `row_parts`: sizes of row groups quantised independently
        (gate and up of a fused gate_up), for formats whose blocks span rows."""
        raise NotImplementedError

    @classmethod
    def empty(cls, rows: list[int], in_features: int, experts: int | None = None,
              device: torch.device | str = "cpu") -> Tensors:
        """Uninitialised tensors for a weight of sum(rows) x in_features (row groups `rows` as in `quantize`),
        stacked `experts` times when given; filled by a checkpoint loader."""
        raise NotImplementedError

    @classmethod
    def derived(cls, rows: list[int], device: torch.device | str = "cpu") -> Tensors:
        """Fields that follow from the shape alone (not read from a checkpoint): recomputed by
        `reset_buffers` after a model built on the meta device gets its storage."""
        return {}

    @classmethod
    def dequantize(cls, t: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def linear_reference(cls, x: torch.Tensor, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The twin: widen, then `F.linear` in x's dtype."""
        return F.linear(x, cls.dequantize(t, x.dtype))

    @classmethod
    def linear(cls, x: torch.Tensor, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return cls.linear_reference(x, t)

    @classmethod
    def concat(cls, parts: list[Mapping[str, torch.Tensor]]) -> tuple[Tensors, list[Tensors]]:
        """Fuse weights sharing an input along their rows -> (the fused tensors, each part's tensors as views
        of the fused ones, to replace the parts' own so that memory is not doubled)."""
        raise NotImplementedError

    @classmethod
    def expert(cls, t: Mapping[str, torch.Tensor], e: int) -> Tensors:
        return {f: (v if f in cls.shared_fields else v[e]) for f, v in t.items()}

    @classmethod
    def experts_kernel(cls, x: torch.Tensor, gate_up: Mapping[str, torch.Tensor], down: Mapping[str, torch.Tensor],
                       ids: torch.Tensor, weights: torch.Tensor,
                       down_fmt: type[WeightFormat] | None = None) -> torch.Tensor | None:
        """The routed experts of a MoE block in one compiled kernel, or None where none applies (the
        dispatch loop in `ops/experts.py` then runs, the kernel's twin). `down_fmt`: the down projection's
        format when it differs from gate_up's (GGUF mixes store them in different block types)."""
        return None

    @classmethod
    def nbytes(cls, t: Mapping[str, torch.Tensor]) -> int:
        return sum(v.numel() * v.element_size() for v in t.values())


class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight is stored in `fmt`; `forward` is `fmt.linear`.

    `in_order` (optional, int64 [in_features]): the stored weight's columns are in another order than the
    layer's inputs; column i multiplies input in_order[i]. Formats whose blocks run along the columns cannot
    reorder them without widening, so the input is gathered instead (one index_select of the activations)."""

    def __init__(self, fmt: type[WeightFormat], tensors: Mapping[str, torch.Tensor], in_features: int,
                 out_features: int, in_order: torch.Tensor | None = None):
        super().__init__()
        self.fmt = fmt
        self.in_features, self.out_features = in_features, out_features
        derived = fmt.derived([out_features])
        for f in fmt.fields:  # derived fields follow from the shape: not part of a checkpoint
            self.register_buffer(f, tensors[f], persistent=f not in derived)
        if in_order is not None and tuple(in_order.shape) != (in_features,):
            raise ValueError(f"in_order has shape {list(in_order.shape)}, expected [{in_features}]")
        self.in_order: torch.Tensor | None
        self.register_buffer("in_order", in_order)

    @classmethod
    def from_weight(cls, fmt: type[WeightFormat], weight: torch.Tensor) -> QuantLinear:
        return cls(fmt, fmt.quantize(weight), weight.shape[1], weight.shape[0])

    def reset_buffers(self) -> None:
        device = getattr(self, self.fmt.fields[0]).device
        for f, v in self.fmt.derived([self.out_features], device).items():
            getattr(self, f).copy_(v)

    @classmethod
    def empty(cls, fmt: type[WeightFormat], in_features: int, out_features: int,
              device: torch.device | str = "cpu") -> QuantLinear:
        return cls(fmt, fmt.empty([out_features], in_features, device=device), in_features, out_features)

    @property
    def tensors(self) -> Tensors:
        return {f: getattr(self, f) for f in self.fmt.fields}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the layer's own input order."""
        w = self.fmt.dequantize(self.tensors, dtype)
        return w if self.in_order is None else w.index_select(-1, torch.argsort(self.in_order))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_order is not None:
            x = x.index_select(-1, self.in_order)
        return self.fmt.linear(x, self.tensors)

    def extra_repr(self) -> str:
        order = ", inputs reordered" if self.in_order is not None else ""
        return f"{self.fmt.name}, in_features={self.in_features}, out_features={self.out_features}{order}"


class QuantEmbedding(nn.Module):
    """A token embedding stored in `fmt` (GGUF files quantize it; widening the 0.8B's would double its memory):
    a lookup widens only the rows it reads, to `dtype`. A tied head multiplies by the same buffer
    (`QuantLinear(fmt, {"qweight": emb.qweight}, ...)`)."""

    def __init__(self, fmt: type[WeightFormat], tensors: Mapping[str, torch.Tensor], num_embeddings: int,
                 embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        if not hasattr(fmt, "dequantize_rows"):
            raise ValueError(f"format {fmt.name} cannot serve as an embedding (no row lookup)")
        self.fmt, self.dtype = fmt, dtype
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        for f in fmt.fields:
            self.register_buffer(f, tensors[f])

    @property
    def tensors(self) -> Tensors:
        return {f: getattr(self, f) for f in self.fmt.fields}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        return self.fmt.dequantize_rows(self.tensors[self.fmt.fields[0]], ids, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, {self.num_embeddings}, {self.embedding_dim}"


class QuantExperts(ExpertDispatch):
    """Routed experts (fused gate_up [E, 2I, H] with gate rows first, down [E, H, I]) stored in `fmt`: the
    same routing and maths as the bf16 `Experts`; buffers `gate_up_proj_<field>` and `down_proj_<field>`."""

    PROJ = ("gate_up_proj", "down_proj")

    def __init__(self, fmt: type[WeightFormat], gate_up: Mapping[str, torch.Tensor],
                 down: Mapping[str, torch.Tensor], down_fmt: type[WeightFormat] | None = None,
                 inner: int | None = None):
        super().__init__()
        self.fmt, self.down_fmt = fmt, down_fmt or fmt
        if self.down_fmt.fields != fmt.fields:
            raise ValueError(f"experts in {fmt.name} and {self.down_fmt.name}: formats with other fields")
        self.num_experts = gate_up[fmt.fields[0]].shape[0]
        self.hidden = down[fmt.fields[0]].shape[-2]
        # the stored inner size, unless the format packs it (GGUF rows are bytes: the caller says)
        self.inner = inner if inner is not None else down[fmt.fields[0]].shape[-1]
        derived = fmt.derived([self.hidden])
        for proj, t in zip(self.PROJ, (gate_up, down), strict=True):
            for f in fmt.fields:
                self.register_buffer(f"{proj}_{f}", t[f], persistent=f not in derived)

    @classmethod
    def from_weights(cls, fmt: type[WeightFormat], gate_up: torch.Tensor, down: torch.Tensor) -> QuantExperts:
        inner = gate_up.shape[1] // 2
        return cls(fmt, fmt.quantize(gate_up, row_parts=[inner, inner]), fmt.quantize(down))

    @classmethod
    def empty(cls, fmt: type[WeightFormat], num_experts: int, hidden: int, inner: int,
              device: torch.device | str = "cpu", down_fmt: type[WeightFormat] | None = None) -> QuantExperts:
        down_fmt = down_fmt or fmt
        return cls(fmt, fmt.empty([inner, inner], hidden, num_experts, device),
                   down_fmt.empty([hidden], inner, num_experts, device), down_fmt, inner)

    def proj_format(self, proj: str) -> type[WeightFormat]:
        return self.down_fmt if proj == "down_proj" else self.fmt

    def reset_buffers(self) -> None:
        for proj, rows in (("gate_up_proj", [self.inner, self.inner]), ("down_proj", [self.hidden])):
            device = getattr(self, f"{proj}_{self.fmt.fields[0]}").device
            for f, v in self.fmt.derived(rows, device).items():
                getattr(self, f"{proj}_{f}").copy_(v)

    def proj_tensors(self, proj: str) -> Tensors:
        return {f: getattr(self, f"{proj}_{f}") for f in self.fmt.fields}

    def dequantize(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.proj_format(proj).dequantize(self.proj_tensors(proj), dtype)

    def expert_linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        fmt = self.proj_format(name)
        return fmt.linear(x, fmt.expert(self.proj_tensors(name), e))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        y = self.fmt.experts_kernel(x, self.proj_tensors("gate_up_proj"), self.proj_tensors("down_proj"), ids,
                                    weights, down_fmt=self.down_fmt)
        return y if y is not None else super().forward(x, weights, ids)

    def extra_repr(self) -> str:
        down = f" (down {self.down_fmt.name})" if self.down_fmt is not self.fmt else ""
        return f"{self.fmt.name}{down}, num_experts={self.num_experts}"
