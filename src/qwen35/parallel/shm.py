"""Collectives between the ranks of one host through shared memory, instead of gloo's loopback TCP (~0.44 ms
per all-reduce of a [1, 1024] fp32 tensor between two processes on the development machine; a decode step of
the 0.8B runs 51 of them).

One file in /dev/shm holds a counter per rank and two buffers, each with a slot per rank. Collective number s
uses buffer s % 2: every rank copies its tensor into its slot, then stores s into its counter, then waits until
every counter reaches s and reads the slots. A rank writes buffer s % 2 again only at collective s + 2, after
it saw every counter reach s + 1, which each rank stores only once it finished reading collective s: so no slot
is overwritten while someone still reads it. Every rank sums the slots in rank order, so all get the same bits.
x86 keeps stores in order and loads in order (TSO), which is what the counter protocol needs; other CPUs use
gloo. Tensors larger than a slot use gloo too.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch

COUNTER_BYTES = 64  # one cache line per rank's counter


def supported() -> bool:
    """x86 (TSO), /dev/shm, the compiled kernels (their memory fence), and QWEN35_TP_SHM not "0"."""
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.isdir("/dev/shm") or \
            os.environ.get("QWEN35_TP_SHM", "1") == "0":
        return False
    from qwen35.ops import cpu_kernels

    k = cpu_kernels.build()
    return k is not None and hasattr(k, "memory_fence")


def slot_bytes_default() -> int:
    return int(os.environ.get("QWEN35_TP_SHM_BYTES", str(16 << 20)))


def create_file(path: str, size: int, slot_bytes: int) -> None:
    """Rank 0: the zeroed file the ranks map."""
    with open(path, "wb") as f:
        f.truncate(size * COUNTER_BYTES + 2 * size * slot_bytes)


class SharedMemoryComm:
    def __init__(self, path: str, rank: int, size: int, slot_bytes: int, timeout_s: float,
                 peers_alive: Callable[[], bool] | None = None):
        """`peers_alive`: checked while waiting, so that a rank that exited is noticed at once (not only after
        `timeout_s`, which catches one that hangs)."""
        self.path, self.rank, self.size, self.slot_bytes, self.timeout_s = path, rank, size, slot_bytes, timeout_s
        self.peers_alive = peers_alive
        total = size * COUNTER_BYTES + 2 * size * slot_bytes
        self.buf = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        self.counters = self.buf[:size * COUNTER_BYTES].view(torch.int64).view(size, COUNTER_BYTES // 8)[:, 0]
        self.data = self.buf[size * COUNTER_BYTES:]
        self.step = 0
        from qwen35.ops import cpu_kernels

        self._fence = cpu_kernels.build().memory_fence

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= self.slot_bytes

    def _slot(self, buffer: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        at = (buffer * self.size + rank) * self.slot_bytes
        n = like.numel() * like.element_size()
        return self.data[at:at + n].view(like.dtype).view(like.shape)

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post `x`, wait for every rank's, return all slots (views: read them before the next collective)."""
        self.step += 1
        buffer = self.step % 2
        self._slot(buffer, self.rank, x).copy_(x)
        self._fence()  # the slot's bytes (memcpy may store them non-temporally) before the counter
        self.counters[self.rank] = self.step
        deadline = None
        spins = 0
        while int(self.counters.min()) < self.step:
            spins += 1
            if spins % 4096 == 0:
                if self.peers_alive is not None and not self.peers_alive():
                    raise RuntimeError(f"shared-memory collective {self.step}: a rank has exited")
                now = time.monotonic()
                deadline = deadline or now + self.timeout_s
                if now > deadline:
                    late = [r for r in range(self.size) if int(self.counters[r]) < self.step]
                    raise RuntimeError(f"shared-memory collective {self.step}: rank(s) {late} did not answer within "
                                       f"{self.timeout_s:.0f} s")
                time.sleep(0)  # let a rank sharing this core run
        return [self._slot(buffer, r, x) for r in range(self.size)]

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """x (contiguous) replaced by the sum over ranks, added in rank order."""
        slots = self._exchange(x)
        x.copy_(slots[0])
        for s in slots[1:]:
            x.add_(s)
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [s.clone() for s in self._exchange(x.contiguous())]
