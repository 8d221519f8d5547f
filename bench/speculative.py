"""MTP speculative decoding on this host: decode tok/s with k = 1, 2, 3 drafts against MTP off and llama.cpp.

    python -m bench.speculative [--batches 1,4] [--tokens 64] [--rounds 3] [--out docs/benchmarks/speculative.md]

Model: the Qwen3.5-0.8B shape with random weights in bf16 (`load_format="dummy"`: the bench's safetensors
checkpoint carries no MTP layer), through `qwen35.LLM` end to end (scheduler, verify step, rollback, the MTP
layer, sampling bookkeeping). Random weights make the MTP layer's drafts all but useless, so its own drafts show
the cost of speculating for nothing, and oracle drafts show the mechanism: the known greedy continuation (made
with MTP off), each draft kept right with probability p (0.5 ... 0.9) and otherwise replaced by a wrong token;
the MTP layer still runs every step (`LLMEngine.draft_override` replaces its drafts), so its cost stays in.
Output is checked equal to MTP off in every run. Decode tok/s = sequences x (tokens - 1) / (generate time -
time to first token), medians over rounds; each configuration runs right after an MTP-off run of the same
batch and *vs MTP off* is the median of those pairs' ratios (this host's memory bandwidth drifts by up to 2x
within minutes, so absolute figures of different moments do not compare). llama.cpp: the same shape's bf16
GGUF (the bench's checkpoint, converted by llama.cpp's converter), decode steps of the same batch after a
prompt of the same length, in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.host import cpu_name

ACCEPTANCES = (0.5, 0.7, 0.8, 0.9)


def oracle_drafts(refs: dict, p: float, vocab: int, seed: int = 0):
    """A `LLMEngine.draft_override`: the known continuation of each prompt (`refs`: prompt ids -> output ids), each
    draft replaced by a wrong token with probability 1 - p; a prompt without one keeps the MTP layer's drafts."""
    rng = random.Random(seed)

    def drafts(seq, mtp_drafts):
        ref = refs.get(tuple(seq.token_ids[:seq.num_prompt_tokens]))
        if ref is None:
            return mtp_drafts
        o = seq.num_output_tokens
        out = []
        for j in range(len(mtp_drafts)):
            right = ref[o + j] if o + j < len(ref) else 0
            out.append(right if rng.random() < p else (right + 1 + rng.randrange(vocab - 1)) % vocab)
        return out

    return drafts


def _ours(args) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    import qwen35
    from qwen35 import SamplingParams

    model = qwen35.load_model("Qwen3.5-0.8B", load_format="dummy", dtype=torch.bfloat16, progress=False)
    vocab = 248044
    g = torch.Generator().manual_seed(0)
    prompts = {b: [torch.randint(0, vocab, (args.prompt,), generator=g).tolist() for _ in range(b)]
               for b in args.batches}
    engines = {k: qwen35.LLM(model, skip_tokenizer_init=True, kv_cache_memory_bytes=768 << 20,
                             enable_prefix_caching=False,
                             speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None)
               for k in (0, *args.ks)}
    full = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def timed(llm, ps, sp) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        return time.perf_counter() - t0, [o.outputs[0].token_ids for o in outs]

    refs = {}
    for b, ps in prompts.items():  # warm-up and the reference continuations
        _, ref = timed(engines[0], ps, full)
        refs[b] = {tuple(p): r for p, r in zip(ps, ref, strict=True)}
    configs = [(b, k, p) for b in args.batches for k in args.ks for p in (*ACCEPTANCES, "mtp")
               if p != "mtp" or k == args.ks[len(args.ks) // 2]]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    ratios: dict[tuple, list[float]] = {c: [] for c in configs}
    off_times: dict[int, list[float]] = {b: [] for b in args.batches}
    ttft: dict[int, list[float]] = {b: [] for b in args.batches}
    stats: dict[tuple, dict] = {}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            b, k, p = c
            # MTP off right before each configuration: the ratio of the pair (this host's bandwidth drifts)
            first_s = timed(engines[0], prompts[b], first)[0]
            off_s = timed(engines[0], prompts[b], full)[0] - first_s
            ttft[b].append(first_s)
            off_times[b].append(off_s)
            llm = engines[k]
            llm.engine.draft_override = None if p == "mtp" else oracle_drafts(refs[b], p, vocab, seed=r)
            before = llm.speculative_stats()
            t, got = timed(llm, prompts[b], full)
            assert got == [refs[b][tuple(q)] for q in prompts[b]], f"output differs from MTP off: {c}"
            times[c].append(t - first_s)
            ratios[c].append(off_s / (t - first_s))
            after = llm.speculative_stats()
            s = stats.setdefault(c, {"drafted": 0, "accepted": 0, "steps": 0})
            s["drafted"] += after["num_draft_tokens"] - before["num_draft_tokens"]
            s["accepted"] += after["num_accepted_tokens"] - before["num_accepted_tokens"]
            s["steps"] += after["num_drafts"] - before["num_drafts"]
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = [{"batch": b, "k": 0, "drafts": "off", "vs_off": 1.0,
             "decode_tok_s": b * (args.tokens - 1) / statistics.median(off_times[b])} for b in args.batches]
    for c in configs:
        b, k, p = c
        s = stats[c]
        rows.append({"batch": b, "k": k, "drafts": "MTP layer" if p == "mtp" else f"oracle p={p}",
                     "decode_tok_s": b * (args.tokens - 1) / statistics.median(times[c]),
                     "vs_off": statistics.median(ratios[c]), "vs_off_range": (min(ratios[c]), max(ratios[c])),
                     "acceptance": s["accepted"] / max(1, s["drafted"]),
                     "tokens_per_step": 1 + s["accepted"] / max(1, s["steps"])})
    return rows


def _llama(args) -> dict[int, float]:
    from bench import models

    gguf = models.make_gguf(models.default_cache_dir(), "0.8b", "bf16")
    out = {}
    for b in args.batches:
        spec = {"engine": "llama", "model": "0.8b", "path": str(gguf), "threads": args.threads,
                "task": {"kind": "decode", "context": args.prompt, "steps": args.tokens, "batch": b}}
        run = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec)], capture_output=True, text=True)
        line = next((ln for ln in run.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if line is None:
            raise SystemExit(run.stderr)
        res = json.loads(line[len("BENCH_RESULT "):])
        if "error" in res:
            raise SystemExit(res["error"])
        out[b] = b / statistics.median(res["step_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,4")
    p.add_argument("--ks", default="1,2,3")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    p.add_argument("--out", default="docs/benchmarks/speculative.md")
    args = p.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.ks = [int(x) for x in args.ks.split(",")]
    rows = _ours(args)
    llama = {} if args.no_llama else _llama(args)
    off = {r["batch"]: r["decode_tok_s"] for r in rows if r["k"] == 0}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch

    cmd = "python -m bench.speculative" + ("" if argv is None else " " + " ".join(argv))
    lines = ["# MTP speculative decoding", "",
             f"Generated by `{cmd}` (qwen35 {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) on "
             f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}.", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             f"Prompt {args.prompt} tokens, {args.tokens} generated tokens per sequence (greedy), {args.rounds} "
             "rounds. *p*: the chance that each oracle draft is right; *acceptance*: accepted / drafted tokens as "
             "measured (later drafts of a step count as drafted after an earlier one failed, as vLLM and llama.cpp "
             "count); *tokens / step*: tokens a verify step commits (accepted drafts + the target's own).", "",
             "| batch | k | drafts | acceptance | tokens / step | decode tok/s | vs MTP off (paired; range) | "
             "vs llama.cpp |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lc = llama.get(r["batch"])
        acc = f"{r['acceptance']:.2f}" if "acceptance" in r else "-"
        tps = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else "1"
        rng = " ({:.2f}-{:.2f})".format(*r["vs_off_range"]) if "vs_off_range" in r else ""
        lines.append(f"| {r['batch']} | {r['k'] or '-'} | {r['drafts']} | {acc} | {tps} | {r['decode_tok_s']:.2f} | "
                     f"{r['vs_off']:.2f}x{rng} | {'%.2fx' % (r['decode_tok_s'] / lc) if lc else '-'} |")
    for b, v in llama.items():
        lines.append(f"| {b} | - | llama.cpp (no drafts) | - | 1 | {v:.2f} | {v / off[b]:.2f}x | 1.00x |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
