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

Tensors = dict[str, torch.Tensor]


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
                       ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """The routed experts of a MoE block in one compiled kernel, or None where none applies (the
        dispatch loop in `ops/experts.py` then runs, the kernel's twin)."""
        return None

    @classmethod
    def nbytes(cls, t: Mapping[str, torch.Tensor]) -> int:
        return sum(v.numel() * v.element_size() for v in t.values())


class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight is stored in `fmt`; `forward` is `fmt.linear`."""

    def __init__(self, fmt: type[WeightFormat], tensors: Mapping[str, torch.Tensor], in_features: int,
                 out_features: int):
        super().__init__()
        self.fmt = fmt
        self.in_features, self.out_features = in_features, out_features
        derived = fmt.derived([out_features])
        for f in fmt.fields:  # derived fields follow from the shape: not part of a checkpoint
            self.register_buffer(f, tensors[f], persistent=f not in derived)

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
        return self.fmt.dequantize(self.tensors, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmt.linear(x, self.tensors)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, in_features={self.in_features}, out_features={self.out_features}"


class QuantExperts(ExpertDispatch):
    """Routed experts (fused gate_up [E, 2I, H] with gate rows first, down [E, H, I]) stored in `fmt`: the
    same routing and maths as the bf16 `Experts`; buffers `gate_up_proj_<field>` and `down_proj_<field>`."""

    PROJ = ("gate_up_proj", "down_proj")

    def __init__(self, fmt: type[WeightFormat], gate_up: Mapping[str, torch.Tensor],
                 down: Mapping[str, torch.Tensor]):
        super().__init__()
        self.fmt = fmt
        self.num_experts = gate_up[fmt.fields[0]].shape[0]
        self.hidden, self.inner = down[fmt.fields[0]].shape[-2:]
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
              device: torch.device | str = "cpu") -> QuantExperts:
        return cls(fmt, fmt.empty([inner, inner], hidden, num_experts, device),
                   fmt.empty([hidden], inner, num_experts, device))

    def reset_buffers(self) -> None:
        for proj, rows in (("gate_up_proj", [self.inner, self.inner]), ("down_proj", [self.hidden])):
            device = getattr(self, f"{proj}_{self.fmt.fields[0]}").device
            for f, v in self.fmt.derived(rows, device).items():
                getattr(self, f"{proj}_{f}").copy_(v)

    def proj_tensors(self, proj: str) -> Tensors:
        return {f: getattr(self, f"{proj}_{f}") for f in self.fmt.fields}

    def dequantize(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.fmt.dequantize(self.proj_tensors(proj), dtype)

    def expert_linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.fmt.linear(x, self.fmt.expert(self.proj_tensors(name), e))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        y = self.fmt.experts_kernel(x, self.proj_tensors("gate_up_proj"), self.proj_tensors("down_proj"), ids,
                                    weights)
        return y if y is not None else super().forward(x, weights, ids)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, num_experts={self.num_experts}"
