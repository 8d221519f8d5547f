"""Which rank this process is, and the collectives of a sharded forward (torch.distributed: gloo on CPU, NCCL
on CUDA)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

#: time this process spent in the forward's collectives (all-reduces and gathers) and how many it ran, for
#: benchmarks (`collective_stats`)
_COLLECTIVES = {"calls": 0, "seconds": 0.0}


def collective_stats() -> dict:
    """{"calls": n, "seconds": s}: the forward's collectives of this process so far."""
    return dict(_COLLECTIVES)


def _timed(fn, *args, **kw) -> None:
    t0 = time.perf_counter()
    fn(*args, **kw)
    _COLLECTIVES["seconds"] += time.perf_counter() - t0
    _COLLECTIVES["calls"] += 1


@dataclass(frozen=True)
class TensorParallel:
    """Rank `rank` of a tensor-parallel group of `size` processes (`group`: a torch.distributed process group,
    None for the default one). `expert_parallel`: MoE layers split their routed experts between the ranks
    (each rank runs whole experts) instead of splitting every expert's inner dimension."""

    rank: int
    size: int
    expert_parallel: bool = False
    group: Any = None
    shm: Any = None  # a parallel.shm.SharedMemoryComm when every rank is on this host (faster than gloo's TCP)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.size!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank!r}")

    def part(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) of `n` items split evenly (n must be a multiple of size: see layout.py)."""
        share = n // self.size
        return self.rank * share, (self.rank + 1) * share

    # ------------------------------------------------------------------ collectives
    def row_parallel(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A row-parallel projection (its input columns split over the ranks): each rank's partial product kept
        in fp32 where the layer can give it (plain bf16 / fp32 weights), summed over the ranks in fp32 and
        rounded once to x's dtype, as one process rounds its one product."""
        from qwen35.ops.linear import Linear

        part = module(x, out_dtype=torch.float32) if type(module) is Linear else module(x)
        return self.all_reduce(part).to(x.dtype)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `x`, added in fp32 and rounded once to `x`'s dtype."""
        import torch.distributed as dist

        total = torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)  # contiguous, ours to write
        if self.shm is not None and self.shm.fits(total):
            _timed(self.shm.all_reduce_, total)
        else:
            _timed(dist.all_reduce, total, group=self.group)
        return total if x.dtype == torch.float32 else total.to(x.dtype)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension (rank order): vocab-parallel logits."""

        return torch.cat(self.all_gather_rows(x), dim=-1)

    def all_gather_rows(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape everywhere), in rank order."""
        import torch.distributed as dist

        if self.shm is not None and self.shm.fits(x):
            box: list = []
            _timed(lambda: box.extend(self.shm.all_gather(x)))
            return box
        parts = [torch.empty_like(x) for _ in range(self.size)]
        _timed(dist.all_gather, parts, x.contiguous(), group=self.group)
        return parts
