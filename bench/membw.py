"""Memory bandwidth as this process sees it with N threads (torch): `python -m bench.membw [threads] [MiB]`.

  * read: sum of a large fp32 array (every byte read once);
  * copy: copy_ between two large arrays (read + write counted);
  * bf16 head: `F.linear` of one token against a [248320, 1024] bf16 matrix (the 0.8B head), the single largest
    read of a decode step, as PyTorch performs it.
Each figure is the median of several repetitions after a warm-up. Prints one line `BENCH_RESULT {json}`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def measure(threads: int = 2, mib: int = 1024, reps: int = 7) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def arrays() -> tuple[float, float]:
        x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        y = torch.empty_like(x)
        nbytes = x.numel() * 4
        return nbytes / timed(lambda: x.sum()) / 1e9, 2 * nbytes / timed(lambda: y.copy_(x)) / 1e9

    def head_linear() -> float:
        w = torch.randn(248320, 1024).to(torch.bfloat16)
        h = torch.randn(1, 1024).to(torch.bfloat16)
        return w.numel() * 2 / timed(lambda: F.linear(h, w)) / 1e9

    read, copy = arrays()
    head = head_linear()
    return {"threads": threads, "mib": mib, "read_gbs": read, "copy_gbs": copy, "bf16_head_linear_gbs": head}


def main() -> int:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    print("BENCH_RESULT " + json.dumps(measure(threads, mib)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
