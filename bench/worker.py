"""One engine, one task, in a process of its own (so that its peak RSS is its own):

    python -m bench.worker '{"engine": "ours", "path": ..., "task": {...}}'

prints one line `BENCH_RESULT {json}`. Tasks:
  * {"kind": "prefill", "n": 512, "reps": 3}: time-to-first-token of an n-token prompt (the prefill, the head
    on the last token, the greedy pick), `reps` times after one warm-up prompt of min(n, chunk) tokens;
  * {"kind": "decode", "context": 1024, "steps": 16, "batch": 1, "fill": "prefill" | "synthetic"}: `batch`
    sequences each holding `context` tokens (prefilled for real, timed, or filled with random KV/state), then
    3 untimed steps and `steps` timed decode steps of one token per sequence;
  * {"kind": "sweep", "contexts": [1024, 32768], "steps": 16, "rounds": 6} (ours, synthetic context): decode
    time against context, every model of `paths` ({label: checkpoint}) and context measured in this one process,
    interleaved step by step. This host's memory bandwidth drifts by up to 2x within seconds (a bare read:
    23-36 GB/s in one process over a minute, 26-51 GB/s across processes), so ratios between contexts or models
    are only comparable when measured side by side like this. Gives `sweep`: {label: {context: [step times of
    each round]}}. With "fill": "prefill" the contexts are prefilled for real instead (timed: `prefill_s`).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

import numpy as np


def prompt(seed: int, n: int, vocab: int) -> list[int]:
    rng = np.random.default_rng([seed, n])
    return rng.integers(0, vocab, size=n).tolist()


def run_e2e(spec: dict) -> dict:
    """qwen35.LLM end to end (scheduler, sampler, detokenizer off): `batch` prompts of `context` tokens, greedy,
    `steps` + 1 tokens each, streamed; the time of every delta is recorded."""
    import torch

    from qwen35 import LLM, SamplingParams

    task = spec["task"]
    torch.set_num_threads(spec.get("threads", 2))
    ctx, steps, B = task["context"], task["steps"], task.get("batch", 1)
    vocab = spec.get("vocab", 248044)
    t0 = time.perf_counter()
    llm = LLM(spec["path"], dtype=torch.bfloat16, skip_tokenizer_init=True, max_model_len=ctx + steps + 64,
              max_num_seqs=max(B, 1))
    res: dict = {"load_s": time.perf_counter() - t0}
    sp = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    list(llm.generate_stream([{"prompt_token_ids": prompt(spec.get("seed", 0) + 1, 32, vocab)}],
                             SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)))  # warm-up
    prompts = [{"prompt_token_ids": prompt(spec.get("seed", 0) + 100 * b, ctx, vocab)} for b in range(B)]
    events: list[tuple[float, str, int]] = []
    t0 = time.perf_counter()
    for out in llm.generate_stream(prompts, sp):
        n = sum(len(c.token_ids) for c in out.outputs)
        if n:
            events.append((time.perf_counter() - t0, out.request_id, n))
    first: dict[str, float] = {}
    for t, rid, _ in events:
        first.setdefault(rid, t)
    # Decode phase: from the moment every request has its first token (all prefills done) to the end.
    t_all = max(first.values())
    after = sum(n for t, _, n in events if t > t_all)
    end = events[-1][0]
    res.update(ttft_s=min(first.values()), ttft_last_s=t_all, total_s=end, tokens=sum(n for _, _, n in events),
               decode_tps=after / (end - t_all) if after and end > t_all else None)
    return res


def run_sweep(spec: dict) -> dict:
    """Every (model, context) pair of the sweep in this process: a cache per pair, then `rounds` rounds of 2
    warm-up and `steps` timed steps of every pair, the pairs taking turns step by step (so that adjacent steps of
    different pairs are ~0.1 s apart) in an order rotated every round. Each round starts the sequences again at
    exactly `context` tokens (the state is random or already used anyway)."""
    from bench.engines import Ours

    task = spec["task"]
    contexts, steps, rounds = task["contexts"], task["steps"], task.get("rounds", 4)
    res: dict = {"load_s": {}, "fill_s": {}}
    engines, pairs = {}, []
    for label, path in spec["paths"].items():
        eng = engines[label] = Ours(path, spec.get("threads", 2))
        res["load_s"][label] = eng.load_s
        for c in contexts:
            eng.open(1, c + steps + 8)
            t0 = time.perf_counter()
            if task.get("fill", "synthetic") == "prefill":
                eng.prefill(0, prompt(spec.get("seed", 0), c, spec.get("vocab", 248044)))
            else:
                eng.synthetic(c)
            res["fill_s"][f"{label}@{c}"] = time.perf_counter() - t0
            pairs.append((label, c, eng.run))
    times: dict = {label: {str(c): [] for c in contexts} for label in engines}
    toks = prompt(spec.get("seed", 0) + 2, 1, spec.get("vocab", 248044))
    def step(pair, tok):
        label, _, run = pair
        eng = engines[label]
        eng.run = run
        t0 = time.perf_counter()
        out = eng.step(tok)
        return out, time.perf_counter() - t0

    for r in range(rounds):
        k = r % len(pairs)
        order = pairs[k:] + pairs[:k]
        last = {}
        for pair in order:
            pair[2].rewind(0, pair[1])
            last[id(pair)] = toks
        ts: dict = {id(pair): [] for pair in order}
        for i in range(2 + steps):
            for pair in order:
                last[id(pair)], dt = step(pair, last[id(pair)])
                if i >= 2:
                    ts[id(pair)].append(dt)
        for pair in order:
            times[pair[0]][str(pair[1])].append(ts[id(pair)])
    res["sweep"] = times
    return res


def run(spec: dict) -> dict:
    from bench.engines import ENGINES

    task = spec["task"]
    if task["kind"] == "e2e":
        return run_e2e(spec)
    if task["kind"] == "sweep":
        return run_sweep(spec)
    kw = {"chunk": spec.get("chunk", 4096)}
    if spec["engine"] == "ours" and spec.get("quant"):
        kw["quantization"] = spec["quant"]
    if spec["engine"] == "llama":
        kw = {"chunk": 512, "flash_attn": spec.get("flash_attn", "off")}
    base = {"llama": ("llama_cpp",), "hf": ("torch", "transformers")}.get(spec["engine"], ("torch", "qwen35"))
    for mod in base:  # the runtime's own memory, before any weights: what the model's share is measured from
        __import__(mod)
    rss_base = current_rss_mb()
    eng = ENGINES[spec["engine"]](spec["path"], spec.get("threads", 2), **kw)
    vocab = spec.get("vocab", 248044)
    seed = spec.get("seed", 0)
    res: dict = {"load_s": eng.load_s, "rss_base_mb": rss_base, "file_bytes": os.path.getsize(spec["path"])
                 if os.path.isfile(spec["path"]) else None}
    # Warm-up: allocations, kernel selection, first-call costs.
    eng.open(1, 64)
    w = prompt(seed + 1, 32, vocab)
    t = eng.prefill(0, w)
    for _ in range(2):
        t = eng.step([t])[0]
    if task["kind"] == "agree":  # greedy next token at every position of one prompt
        res["argmax"] = eng.argmax_all(prompt(seed + 7, task["n"], vocab))
    elif task["kind"] == "prefill":
        n = task["n"]
        ids = prompt(seed, n, vocab)
        eng.open(1, n + 8)
        eng.prefill(0, ids[: min(n, spec.get("chunk", 4096))])
        times, first = [], None
        for _ in range(task.get("reps", 3)):
            eng.open(1, n + 8)
            t0 = time.perf_counter()
            first = eng.prefill(0, ids)
            times.append(time.perf_counter() - t0)
        res.update(prefill_s=times, first_token=first)
    elif task["kind"] == "decode":
        ctx, steps, B = task["context"], task["steps"], task.get("batch", 1)
        eng.open(B, ctx + steps + 8)
        if task.get("fill", "prefill") == "synthetic":
            t0 = time.perf_counter()
            eng.synthetic(ctx)
            res["fill_s"] = time.perf_counter() - t0
            toks = prompt(seed + 2, B, vocab)
        else:
            prompts = [prompt(seed + 100 * b, ctx, vocab) for b in range(B)]
            t0 = time.perf_counter()
            toks = eng.prefill_all(prompts)
            res["prefill_s"] = [time.perf_counter() - t0]
        res["first_token"] = toks[0]
        for _ in range(3):
            toks = eng.step(toks)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            toks = eng.step(toks)
            times.append(time.perf_counter() - t0)
        res.update(step_s=times, cache_bytes=getattr(eng, "cache_bytes", None))
    else:
        raise ValueError(f"unknown task kind {task['kind']!r}")
    return res


def _status_mb(key: str) -> float | None:
    """A memory figure of /proc/self/status (VmRSS, VmHWM) in MB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """VmHWM of this process. (ru_maxrss is not used: Linux keeps it across exec, so a worker would report at
    least its parent's peak.)"""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def source_hash() -> str | None:
    """A short hash of the qwen35 sources this process imports (the tree may change while a long run goes on)."""
    import hashlib

    try:
        import qwen35

        root = os.path.dirname(qwen35.__file__)
    except ImportError:
        return None
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(files):
            if f.endswith((".py", ".c", ".cpp", ".h")):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    return h.hexdigest()[:10]


def main() -> int:
    spec = json.loads(sys.argv[1])
    out: dict = {"engine": spec["engine"], "model": spec.get("model"), "task": spec["task"]}
    try:
        out.update(run(spec))
    except Exception as e:  # reported, not raised: the harness goes on with the other engines
        from bench.engines import Unsupported

        out["error"] = f"{type(e).__name__}: {e}"
        out["unsupported"] = isinstance(e, Unsupported)
        if not out["unsupported"]:
            traceback.print_exc()
    out["rss_mb"] = peak_rss_mb()
    if spec["engine"] == "ours":
        out["src_hash"] = source_hash()
    out["loadavg_end"] = os.getloadavg()
    print("BENCH_RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
