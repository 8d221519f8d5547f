"""Linear layers for decoding: a bandwidth-bound bf16 GEMV kernel on CPU, with `F.linear` as the
obviously-correct twin.

Decoding multiplies a few activation rows by every weight matrix, so its speed is the memory
bandwidth. PyTorch's bf16 `linear` for a handful of rows runs far below it on CPU (measured ~1-2 GB/s on
mid-size matrices vs ~30 GB/s of DRAM bandwidth), so for up to `GEMV_MAX_ROWS` rows on CPU we call our
own kernel (csrc/gemv.cpp, compiled on first use for this machine). Larger batches (prefill) stay on
`F.linear`, which is compute-bound and already uses oneDNN. Set QWEN35_CPU_KERNELS=0 to disable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.ops import cpu_kernels as _ck
from qwen35.ops.hugepages import advise_hugepages

# Decode batches (and verify steps of speculative decoding) up to this many rows use the GEMV kernel: each row's sums
# in the same order whatever the number of rows, so a row's result does not depend on the batch (MTP on gives the
# same bf16 numbers as off). Measured on 2 threads of an Intel Xeon without AVX512-BF16, 0.8B shapes [7168, 1024]
# and [1024, 3584]: 12 rows 1.66 / 0.70 ms against 2.17 / 1.39 ms for the fp32 tiles, 32 rows 3.94 / 1.88 against
# 3.89 / 1.81 (x widened once per call).
GEMV_MAX_ROWS = 32
set_cpu_kernels = _ck.set_enabled
# Prompts on a CPU without bf16 dot products (no AVX512-BF16, no AMX): oneDNN's bf16 GEMM runs at about a fifth
# of its fp32 GEMM there (~63 against ~290 GFLOP/s on 2 threads of an Intel Xeon without them), so bf16 weights
# are widened to fp32 this many bytes of rows at a time and multiplied in fp32: the same exact products and fp32
# sums, rounded once (0.8B shapes at 512 rows: 4.7-5.2x faster; 16 rows: 1.1x).
FP32_TILE_BYTES = 4 << 20
_slow_bf16_gemm: bool | None = None


def cpu_kernels():
    """The compiled kernels (built on first use), or None where they cannot be built."""
    return _ck.build()


def linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T. `out_dtype` defaults to x's dtype (fp32 accumulation either way)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (0 < rows <= GEMV_MAX_ROWS and x.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.is_contiguous() and weight.dim() == 2):
        k = _ck.kernels()
        if k is not None:
            x2 = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
            want = out_dtype or x.dtype
            y = k.gemv_bf16(x2, weight, want == torch.bfloat16)
            return (y if y.dtype == want else y.to(want)).reshape(*x.shape[:-1], weight.shape[0])
    # fp32 asked of bf16 operands: torch's CPU GEMM would round to bf16 first (no fp32 output for bf16 on CPU),
    # so row-parallel partial sums (tensor parallelism) and fp32 logits of many rows take the fp32 tiles too
    if (rows > GEMV_MAX_ROWS and x.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and x.dtype == torch.bfloat16 and (out_dtype == torch.float32 or _bf16_gemm_is_slow())):
        y = linear_fp32_tiles(x.reshape(rows, x.shape[-1]), weight, out_dtype or x.dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight)
    return y if out_dtype is None else y.to(out_dtype)


def _bf16_gemm_is_slow() -> bool:
    """True on a CPU without bf16 dot products (what the compiled kernels were built for: -march=native)."""
    global _slow_bf16_gemm
    if _slow_bf16_gemm is None:
        k = _ck.kernels()
        _slow_bf16_gemm = k is not None and hasattr(k, "gguf_prefill_bf16") and not k.gguf_prefill_bf16()
    return _slow_bf16_gemm


def linear_fp32_tiles(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T with bf16 inputs in fp32: weight rows widened FP32_TILE_BYTES at a time, each
    tile's fp32 product rounded into its columns of the output once (F.linear's semantics, another sum order)."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    xf = x.float()
    tile = max(64, FP32_TILE_BYTES // (4 * max(K, 1)))
    for n0 in range(0, N, tile):
        out[:, n0:n0 + tile] = xf @ weight[n0:n0 + tile].float().t()
    return out


class Linear(nn.Linear):
    """nn.Linear (no bias) whose forward uses `linear`: same parameters, same names, same results."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        if bias:
            raise ValueError("qwen35.ops.linear.Linear has no bias")
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return linear(x, self.weight, out_dtype)


class FusedLinears:
    """Linear layers that read the same input, run as one product over one concatenated weight.

    Decoding pays a dispatch and a thread barrier per matrix; fusing q|k|v, gate|up and the four GDN input
    projections removes ~90 of them per token on the 0.8B. The parts' weights become row views of the fused
    matrix, so parameters, names and memory are unchanged. Works for `Linear` parts and for `QuantLinear` parts
    of one format (the format's `concat` fuses its tensors). `usable()` is False once a part was replaced or
    moved (e.g. by quantisation or `.to()`): callers then run the parts one by one.
    """

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts
        self.sizes = [p.out_features for p in parts]
        self.fmt = getattr(parts[0], "fmt", None)  # None: plain bf16/fp32 Linear parts
        with torch.no_grad():
            if self.fmt is not None:
                self.tensors, views = self.fmt.concat([p.tensors for p in parts])
                for p, v in zip(parts, views, strict=True):
                    for f, t in v.items():
                        setattr(p, f, t)
            else:
                w0 = parts[0].weight
                fused = torch.empty(sum(self.sizes), w0.shape[1], dtype=w0.dtype, device=w0.device)
                self.weight = torch.cat([p.weight.data for p in parts], out=advise_hugepages(fused))
                for p, w in zip(parts, self.weight.split(self.sizes), strict=True):
                    p.weight.data = w
        self._ptrs = [t.data_ptr() for t in self._part_tensors()]

    @classmethod
    def of(cls, parts: list[nn.Module]) -> FusedLinears | None:
        """Fuse when every part is a plain `Linear` (or every part a `QuantLinear` of one format) on one device
        and dtype."""
        from qwen35.ops.quant import QuantLinear

        if all(type(p) is Linear for p in parts):
            ws = [p.weight for p in parts]
        elif (all(isinstance(p, QuantLinear) and p.in_order is None for p in parts)
              and len({p.fmt for p in parts}) == 1):
            ws = [p.tensors[p.fmt.fields[0]] for p in parts]
        else:
            return None
        if len({(w.device, w.dtype, w.shape[1]) for w in ws}) != 1:
            return None
        return cls(parts)

    def _part_tensors(self) -> list[torch.Tensor]:
        if self.fmt is not None:
            return [getattr(p, f) for p in self.parts for f in self.fmt.fields]
        return [p.weight for p in self.parts]

    def usable(self) -> bool:
        """The parts still hold the views made at fusion (not replaced or moved since)."""
        return [t.data_ptr() for t in self._part_tensors()] == self._ptrs

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.fmt.linear(x, self.tensors) if self.fmt is not None else linear(x, self.weight)
        return list(y.split(self.sizes, dim=-1))


def _kind(m: nn.Module) -> object:
    """Parts of one kind fuse: plain `Linear`s, or `QuantLinear`s of one format."""
    if type(m) is Linear:
        return "linear"
    fmt = getattr(m, "fmt", None)
    return ("quant", fmt.name) if fmt is not None and hasattr(m, "tensors") else id(m)


class Projections:
    """Linear-like layers applied to one input, fused into as few products as their kinds allow (consecutive
    `Linear`s together, consecutive `QuantLinear`s of one format together). Calling it with the module's current
    parts gives their outputs in order; a part replaced since fusing, or a fusion no longer valid, runs on its own."""

    def __init__(self, parts: list[nn.Module]):
        self.parts = list(parts)
        self.groups: list[FusedLinears | list[nn.Module]] = []
        run: list[nn.Module] = []
        for p in self.parts + [None]:
            if run and (p is None or _kind(p) != _kind(run[-1])):
                fused = FusedLinears.of(run) if len(run) > 1 else None
                self.groups.append(fused if fused is not None else run)
                run = []
            if p is not None:
                run.append(p)

    @property
    def fused(self) -> bool:
        return any(isinstance(g, FusedLinears) for g in self.groups)

    def __call__(self, x: torch.Tensor, parts: list[nn.Module]) -> list[torch.Tensor]:
        if any(a is not b for a, b in zip(parts, self.parts, strict=True)):
            return [p(x) for p in parts]
        out: list[torch.Tensor] = []
        for g in self.groups:
            if isinstance(g, FusedLinears) and g.usable():
                out += g(x)
            else:
                out += [p(x) for p in (g.parts if isinstance(g, FusedLinears) else g)]
        return out


def run_projections(module: nn.Module, x: torch.Tensor, parts: list[nn.Module]) -> list[torch.Tensor]:
    """`parts` on `x`, through the module's fused `Projections` when `fuse_projections` made one."""
    fused = getattr(module, "_projections", None)
    return fused(x, parts) if fused is not None else [p(x) for p in parts]


def fuse_projections(model: nn.Module) -> int:
    """Fuse the input projections of every module that names them (`projection_parts()`: attention q|k|v,
    the GDN's four, SwiGLU gate|up); returns how many modules got a fused product."""
    n = 0
    for m in model.modules():
        parts_of = getattr(m, "projection_parts", None)
        if callable(parts_of):
            proj = Projections(parts_of())
            m._projections = proj if proj.fused else None
            n += proj.fused
    return n
