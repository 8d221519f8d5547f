"""Structured output on this host: what a grammar's token mask costs per decode step, at batch 1 and 16.

    python -m bench.structured [--batches 1,16] [--tokens 32] [--rounds 2] [--out docs/benchmarks/structured.md]

Model: the Qwen3.5-0.8B shape with random weights in bf16 (`load_format="dummy"`) and the built-in Qwen3.5
tokenizer, through `qwen35.LLM` end to end. Each batch decodes the same prompts with and without a grammar, one
right after the other (this host's memory bandwidth drifts within minutes: only pairs compare); *vs off* is the
median of those pairs' step-time ratios. The grammar is a JSON schema whose output is an array of free strings,
so that random weights keep writing inside a string, where the mask is widest (~150K of the 248K tokens allowed)
and costs the most: greedy rows then go through the head screen with the mask (ops/head_screen.py,
`masked_argmax`), sampled rows mask the full logits. *mask ms* is the time spent computing the masks
(llguidance, plus turning its bitmask into a bool row) per step, for the whole batch. Step times are the median
over a run's decode steps (`LLMEngine.step`, the prefill step left out): other processes share this host, and
the median keeps the steps they slowed down out of the figure.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.host import cpu_name

SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
          "required": ["notes"]}


def _measure(args) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    import qwen35
    from qwen35 import SamplingParams, StructuredOutputsParams
    from qwen35.engine import structured

    model = qwen35.load_model("Qwen3.5-0.8B", load_format="dummy", dtype=torch.bfloat16, progress=False)
    tok = qwen35.load_tokenizer(None)
    llm = qwen35.LLM(model, tokenizer=tok, kv_cache_memory_bytes=768 << 20, enable_prefix_caching=False)
    mask_time = [0.0]
    real_allowed = structured.GrammarState.allowed

    def timed_allowed(self):
        t0 = time.perf_counter()
        try:
            return real_allowed(self)
        finally:
            mask_time[0] += time.perf_counter() - t0

    structured.GrammarState.allowed = timed_allowed
    g = torch.Generator().manual_seed(0)
    prompts = {b: [torch.randint(0, 248044, (args.prompt,), generator=g).tolist() for _ in range(b)]
               for b in args.batches}
    spec = StructuredOutputsParams(json=SCHEMA)
    modes = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, seed=0)}

    step_times: list[float] = []
    real_step = llm.engine.step

    def timed_step():
        t0 = time.perf_counter()
        try:
            return real_step()
        finally:
            step_times.append(time.perf_counter() - t0)

    llm.engine.step = timed_step

    def run(ps, sp) -> tuple[float, float]:
        """(median decode step seconds, mask seconds per decode step). The median over the steps of one run: the
        host is shared, and a step that another process slowed down says nothing of the grammar."""
        step_times.clear()
        mask_time[0] = 0.0
        llm.generate(ps, sp, use_tqdm=False)
        decode = step_times[1:-1] if len(step_times) > 2 else step_times  # not the prefill, not the last report
        return statistics.median(decode), mask_time[0] / max(1, len(step_times) - 1)

    rows = []
    llm.generate(prompts[args.batches[0]][:1], SamplingParams(max_tokens=2, structured_outputs=spec), use_tqdm=False)
    for b in args.batches:
        for mode, kw in modes.items():
            off_sp = SamplingParams(max_tokens=args.tokens, ignore_eos=True, **kw)
            on_sp = off_sp.clone(structured_outputs=spec)
            offs, ons, masks, ratios = [], [], [], []
            for _ in range(args.rounds):
                off, _ = run(prompts[b], off_sp)
                on, mask = run(prompts[b], on_sp)
                offs.append(off)
                ons.append(on)
                masks.append(mask)
                ratios.append(on / off)
            rows.append({"batch": b, "mode": mode, "off_ms": 1e3 * statistics.median(offs),
                         "on_ms": 1e3 * statistics.median(ons), "mask_ms": 1e3 * statistics.median(masks),
                         "ratio": statistics.median(ratios), "range": (min(ratios), max(ratios))})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/benchmarks/structured.md")
    args = p.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    rows = _measure(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import llguidance
    import torch

    cmd = "python -m bench.structured" + ("" if argv is None else " " + " ".join(argv))
    lines = ["# Structured output: the token mask's cost", "",
             f"Generated by `{cmd}` (qwen35 {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) on "
             f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, llguidance {llguidance.__version__}.",
             "", __doc__.split("\n\n", 2)[2].strip(), "",
             f"Prompt {args.prompt} tokens, {args.tokens} generated tokens per sequence, {args.rounds} rounds "
             "(medians). Goal: a grammar costs under 10% of a step.", "",
             "| batch | rows | step, no grammar (ms) | step, grammar (ms) | mask (ms / step) "
             "| vs off (paired; range) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['mode']} | {r['off_ms']:.1f} | {r['on_ms']:.1f} | {r['mask_ms']:.2f} | "
                     "{:.3f}x ({:.3f}-{:.3f}) |".format(r["ratio"], *r["range"]))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
