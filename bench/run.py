"""`qwen35 bench` (also `python -m bench`): our engine against transformers and llama.cpp, in the same run.

Every measurement runs in a fresh process of its own (one engine, one task), engines interleaved round by round
(A B C, then B C A, ...), so that the machine's drift hits all of them alike; ratios are taken pair by pair inside a
round and their median is reported. See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE_NAMES = {"ours": "qwen35", "ours-fullhead": "qwen35 (full bf16 head)", "ours-fp8": "qwen35 FP8",
                "ours-gguf": "qwen35 GGUF", "ours-gguf-exact": "qwen35 GGUF widened to fp32", "hf": "transformers",
                "llama": "llama.cpp"}
SECTIONS = ("bandwidth", "prefill", "decode", "batch", "context", "moe", "q8", "e2e", "screen", "fp8", "gguf")
# the gguf section: files made by llama.cpp (converter, then its quantize); speed on the first two, agreement on all
GGUF_SPEED, GGUF_AGREE = ("q8_0", "q4_k_m"), ("q8_0", "q6_k", "q4_k_m")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: 0.8B prefill 512 + decode at 1K for every engine, the hybrid-vs-twin context "
                        "sweep (ours), bandwidth; one round")
    p.add_argument("--full", action="store_true",
                   help="everything, with 32K prompts (slow, ~2 h): decode after a real 32K prefill (which also times "
                        "the 32K prefill), int8 against llama.cpp Q8_0, qwen35.LLM end to end, the MoE; two rounds")
    p.add_argument("--long", action="store_true",
                   help="add 32K to the decode contexts: a real 32K prefill (timed: the prefill-32K figure), then "
                        "decode (slow)")
    p.add_argument("--sections", default=None,
                   help=f"comma list of sections to run (default depends on --quick/--full): {','.join(SECTIONS)}")
    p.add_argument("--engines", default="ours,hf,llama", help="comma list of ours, hf (transformers), llama")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1 quick, 2, 3 full)")
    p.add_argument("--prefill-lens", default=None, help="comma list of prompt lengths (default 512,4096)")
    p.add_argument("--contexts", default=None, help="decode contexts, comma list (default 1024,8192)")
    p.add_argument("--sweep", default="1024,8192,32768", help="contexts of the hybrid-vs-twin sweep (synthetic)")
    p.add_argument("--sweep-rounds", type=int, default=None,
                   help="rounds inside each hybrid-vs-twin sweep process (default 3 quick, 6)")
    p.add_argument("--batches", default="1,4,16", help="batch sizes of the throughput section")
    p.add_argument("--batch-context", type=int, default=512, help="prompt length of each sequence in a batch")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per measurement (default 8 quick, 16)")
    p.add_argument("--hf-max-context", type=int, default=8192,
                   help="transformers is skipped above this many tokens (its 32K prefill takes many minutes)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens per forward), ours and transformers")
    p.add_argument("--llama-fa", choices=("off", "on", "auto"), default="off",
                   help="llama.cpp flash attention (off: llama_cpp.Llama's default)")
    p.add_argument("--cache-dir", default=None, help="where the checkpoints are made (default ~/.cache/qwen35-bench, "
                                                     "or $QWEN35_BENCH_CACHE)")
    p.add_argument("--converter", default=None,
                   help="folder with llama.cpp's convert_hf_to_gguf.py and gguf-py (the llama-cpp-python sdist's "
                        "vendor/llama.cpp; default: looked for in /tmp/llama_sdist and the cache dir)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds for one measurement process")
    p.add_argument("--quiet", type=float, default=0.25,
                   help="a measurement waits until other processes use less than this fraction of the CPUs, and is "
                        "repeated when they used more while it ran (shared machine)")
    p.add_argument("--quiet-wait", type=int, default=180, help="seconds to wait for a quiet machine, at most")
    p.add_argument("--retries", type=int, default=2, help="repeats of a disturbed measurement")
    p.add_argument("--retry-max-s", type=int, default=300, help="measurements longer than this are not repeated")
    p.add_argument("--out", default=None,
                   help="markdown report to write ('-' for none). Default: docs/benchmarks.md for the default and "
                        "--full runs; CACHE_DIR/report/benchmarks.md for --quick / --sections runs")
    p.add_argument("--results", default=None, help="results JSON (default: next to the report, "
                                                   "docs/benchmarks/results.json)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from --results, measure nothing")
    p.add_argument("--models", default=None, help=argparse.SUPPRESS)  # tests: e.g. tiny


# ----------------------------------------------------------------------------------------------------- plan
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def make_plan(args: argparse.Namespace) -> dict:
    quick, full = args.quick, args.full
    if args.sections:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        bad = set(sections) - set(SECTIONS)
        if bad:
            raise ValueError(f"unknown sections {sorted(bad)}; expected some of {SECTIONS}")
    elif quick:
        sections = ["bandwidth", "prefill", "decode", "context"]
    elif full:
        sections = list(SECTIONS)
    else:
        sections = ["bandwidth", "prefill", "decode", "batch", "context", "moe"]
    long = args.long or full
    prefill = _ints(args.prefill_lens) if args.prefill_lens else ([512] if quick else [512, 4096])
    contexts = _ints(args.contexts) if args.contexts else ([1024] if quick else [1024, 8192])
    if long:  # the 32K prefill is timed by the decode task's own prefill: no separate (equally long) run
        contexts = sorted(set(contexts) | {32768})
    return {
        "sections": sections,
        "engines": [e.strip() for e in args.engines.split(",") if e.strip()],
        "rounds": args.rounds or (1 if quick else 2),
        "prefill": prefill, "contexts": contexts, "sweep": _ints(args.sweep), "batches": _ints(args.batches),
        "sweep_rounds": args.sweep_rounds or (3 if quick else 6),
        "batch_context": args.batch_context, "steps": args.steps or (8 if quick else 16),
        "hf_max": args.hf_max_context, "threads": args.threads, "quiet": args.quiet, "quiet_wait": args.quiet_wait,
        "retries": args.retries, "retry_max_s": args.retry_max_s, "chunk": args.chunk, "llama_fa": args.llama_fa,
        "models": (args.models.split(",") if args.models else None),
    }


# ----------------------------------------------------------------------------------------------------- machine
def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                             "L3 cache", "Flags"):
                v = v.strip()
                if k.strip() == "Flags":
                    v = " ".join(f for f in v.split() if f.startswith(("avx512", "amx", "avx2")))
                info[k.strip()] = v
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    vers = {}
    for mod in ("torch", "transformers", "llama_cpp", "numpy"):
        try:
            r = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True,
                               text=True, timeout=120)
            vers[mod] = r.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            vers[mod] = None
    info["versions"] = vers
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "src"],
                               capture_output=True, text=True).stdout.strip()
        info["git"] = commit + (" (+ uncommitted changes in src/)" if dirty else "")
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------------- running
class Runner:
    def __init__(self, plan: dict, cache: Path, converter: str | None, timeout: int, log):
        self.plan, self.cache, self.converter, self.timeout, self.log = plan, cache, converter, timeout, log
        self.results: list[dict] = []
        self._paths: dict = {}
        self.notes: list[str] = []

    def path(self, engine: str, model: str, gguf: str = "bf16") -> str | None:
        from bench import models

        key = (engine, model, gguf)
        if key not in self._paths:
            try:
                if engine in ("llama", "ours-gguf", "ours-gguf-exact"):  # the same file for all
                    self._paths[key] = str(models.make_gguf(self.cache, model, gguf, self.converter))
                elif engine == "ours-fp8":  # the official FP8 layout, loaded as such (kept in 8 bits)
                    self._paths[key] = str(models.make_fp8_checkpoint(self.cache, model))
                else:
                    self._paths[key] = str(models.make_checkpoint(self.cache, model))
            except (FileNotFoundError, RuntimeError) as e:
                self.note(f"{ENGINE_NAMES[engine]} skipped on {model} ({gguf}): {e}")
                self._paths[key] = None
        return self._paths[key]

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
            self.log(f"NOTE: {msg}")

    def llama_ok(self) -> bool:
        if not hasattr(self, "_llama_ok"):
            r = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, text=True)
            self._llama_ok = r.returncode == 0
            if not self._llama_ok:
                self.note("llama.cpp skipped: llama_cpp is not importable (pip install llama-cpp-python==0.3.36; it "
                          "compiles llama.cpp, ~12 min)")
        return self._llama_ok

    def wait_quiet(self) -> float:
        """Wait (up to --quiet-wait seconds) until other processes use less than --quiet of the CPUs; the busy
        fraction last seen."""
        if self.plan["quiet_wait"] <= 0:  # told not to wait: only note how busy the machine is
            return cpu_busy(0.5)
        deadline = time.time() + self.plan["quiet_wait"]
        while True:
            busy = cpu_busy(2.0)
            if busy <= self.plan["quiet"] or time.time() >= deadline:
                return busy
            self.log(f"   waiting for a quieter machine: other processes use {busy:.0%} of the CPUs")
            time.sleep(10)

    def worker(self, spec: dict) -> dict:
        """One measurement process; repeated (up to --retries times) when other processes took more than --quiet
        of the CPUs while it ran. The least disturbed attempt is kept."""
        best = None
        for attempt in range(self.plan["retries"] + 1):
            res = self._worker_once(spec)
            res["attempt"] = attempt
            if best is None or res.get("others_cpu", 1) < best.get("others_cpu", 1):
                best = res
            if res.get("error") or res.get("others_cpu", 0) <= self.plan["quiet"]:
                break
            if res.get("wall_s", 0) > self.plan["retry_max_s"]:
                self.log(f"   disturbed (other processes used {res['others_cpu']:.0%} of the CPUs), but too long to "
                         "repeat")
                break
            self.log(f"   disturbed (other processes used {res['others_cpu']:.0%} of the CPUs): again")
        return best

    def _worker_once(self, spec: dict) -> dict:
        busy_before = self.wait_quiet()
        env = dict(os.environ, OMP_NUM_THREADS=str(self.plan["threads"]), PYTHONPATH=os.pathsep.join(
            [str(REPO), os.environ.get("PYTHONPATH", "")]), TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "bench.worker", json.dumps(spec)]
        load0 = os.getloadavg()
        stat0, kids0 = proc_stat(), children_cpu()
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=self.timeout)
            out, err = r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            out, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        wall = time.perf_counter() - t0
        stat1, kids1 = proc_stat(), children_cpu()
        res = None
        for line in out.splitlines():
            if line.startswith("BENCH_RESULT "):
                res = json.loads(line[len("BENCH_RESULT "):])
        if res is None:
            res = {"engine": spec["engine"], "task": spec["task"], "error": f"no result; stderr tail: {err[-1500:]}"}
        ncpu = os.cpu_count() or 1
        others = ((stat1[0] - stat0[0]) / CLK_TCK - (kids1 - kids0)) / max(wall * ncpu, 1e-9)
        res.update(model=spec["model"], loadavg_start=load0, wall_s=wall, gguf=spec.get("gguf"),
                   busy_before=busy_before, others_cpu=max(0.0, others))
        return res

    def measure(self, section: str, model: str, task: dict, rnd: int, engines: list[str], gguf: str = "bf16",
                ours_quant: str | None = "auto") -> None:
        """`ours_quant`: --quantization for our bf16 engine ("auto": int8 against llama.cpp's Q8_0, else none)."""
        if ours_quant == "auto":
            ours_quant = "int8" if gguf == "q8_0" else None
        order = engines[rnd % len(engines):] + engines[:rnd % len(engines)]
        for eng in order:
            if eng == "llama" and not self.llama_ok():
                continue
            size = max(task.get("n", 0), task.get("context", 0))
            if eng == "hf" and size > self.plan["hf_max"]:
                self.note(f"transformers skipped at {size} tokens (above --hf-max-context {self.plan['hf_max']})")
                continue
            path = self.path(eng, model, gguf)
            if path is None:
                continue
            spec = {"engine": eng, "model": model, "path": path, "task": task, "threads": self.plan["threads"],
                    "chunk": self.plan["chunk"], "flash_attn": self.plan["llama_fa"],
                    "vocab": 500 if model.startswith("tiny") else 248044,
                    "gguf": gguf if eng in ("llama", "ours-gguf", "ours-gguf-exact") else None,
                    "quant": ours_quant if eng == "ours" else None}
            variant = (" " + gguf) if spec["gguf"] else f" {spec['quant']}" if spec["quant"] else ""
            self.log(f"round {rnd + 1}: {section} {model} {ENGINE_NAMES[eng]}{variant} "
                     f"{json.dumps(task)} ...")
            res = self.worker(spec)
            res.update(section=section, round=rnd)
            self.log("   " + summarize(res))
            self.results.append(res)

    def measure_sweep(self, model: str, rnd: int, fill: str = "synthetic") -> None:
        """The hybrid-vs-twin sweep: both models and every context in one process (bench/worker.py, kind "sweep"),
        recorded as one decode result per (model, context, inner round); inner round i of bench round r is round
        1000 r + i, so that the report's per-round ratios pair measurements made side by side. With fill "prefill"
        (section "context_real"): the hybrid only, at 1K and 32K, after real prefills."""
        p = self.plan
        section = "context" if fill == "synthetic" else "context_real"
        if fill == "synthetic":
            labels = {model: self.path("ours", model), model + "-twin": self.path("ours", model + "-twin")}
            contexts = p["sweep"]
        else:
            labels, contexts = {model: self.path("ours", model)}, [1024, 32768]
        if None in labels.values():
            return
        spec = {"engine": "ours", "model": model, "paths": labels, "threads": p["threads"],
                "vocab": 500 if model.startswith("tiny") else 248044,
                "task": {"kind": "sweep", "contexts": contexts, "steps": p["steps"], "rounds": p["sweep_rounds"],
                         "fill": fill}}
        self.log(f"round {rnd + 1}: {section} {' + '.join(labels)} qwen35 {json.dumps(spec['task'])} ...")
        res = self.worker(spec)
        if res.get("error"):
            self.log("   " + summarize(res))
            res.update(section=section, round=rnd, task={"kind": "decode", "context": max(contexts), "batch": 1,
                                                          "fill": fill, "paired": True})
            self.results.append(res)
            return
        for label, by_ctx in res["sweep"].items():
            for c, rounds in by_ctx.items():
                for i, ts in enumerate(rounds):
                    one = {k: v for k, v in res.items() if k not in ("sweep", "task", "model")}
                    one.update(model=label, section=section, round=1000 * rnd + i, step_s=ts,
                               task={"kind": "decode", "context": int(c), "steps": p["steps"], "batch": 1,
                                     "fill": fill, "paired": True})
                    self.results.append(one)
        for label, by_ctx in res["sweep"].items():
            self.log("   " + label + ": " + ", ".join(
                f"{int(c) // 1024}K {1 / statistics.median([t for ts in rounds for t in ts]):.2f} tok/s"
                for c, rounds in by_ctx.items()))

    def bandwidth(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        for _ in range(self.plan["rounds"]):
            self.wait_quiet()
            r = subprocess.run([sys.executable, "-m", "bench.membw", str(self.plan["threads"])], capture_output=True,
                               text=True, env=env, cwd=REPO)
            for line in r.stdout.splitlines():
                if line.startswith("BENCH_RESULT "):
                    res = json.loads(line[len("BENCH_RESULT "):])
                    res.update(section="bandwidth", loadavg_start=os.getloadavg())
                    self.log("   bandwidth: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()
                                                         if k.endswith("gbs")))
                    self.results.append(res)

    def run(self) -> None:
        p = self.plan
        dense = (p["models"] or ["0.8b"])[0]
        moe = (p["models"] or ["0.8b", "moe"])[-1] if p["models"] is None or len(p["models"]) > 1 else None
        steps = p["steps"]
        for rnd in range(p["rounds"]):
            for sec in p["sections"]:
                if sec == "bandwidth" and rnd == 0:
                    self.bandwidth()
                elif sec == "prefill":
                    for n in p["prefill"]:
                        reps = 3 if n <= 1024 else 2 if n <= 4096 else 1
                        self.measure(sec, dense, {"kind": "prefill", "n": n, "reps": reps}, rnd, p["engines"])
                elif sec == "decode":
                    for c in p["contexts"]:
                        self.measure(sec, dense, {"kind": "decode", "context": c, "steps": steps, "batch": 1,
                                                  "fill": "prefill"}, rnd, p["engines"])
                elif sec == "batch":
                    for b in p["batches"]:
                        self.measure(sec, dense, {"kind": "decode", "context": p["batch_context"], "steps": steps,
                                                  "batch": b, "fill": "prefill"}, rnd, p["engines"])
                elif sec == "context":
                    self.measure_sweep(dense, rnd)
                    if 32768 in p["contexts"]:  # --long: the hybrid after real prefills, paired the same way
                        self.measure_sweep(dense, rnd, fill="prefill")
                elif sec == "moe" and moe:
                    self.measure(sec, moe, {"kind": "prefill", "n": 512, "reps": 2}, rnd, p["engines"])
                    self.measure(sec, moe, {"kind": "decode", "context": 1024, "steps": steps, "batch": 1,
                                            "fill": "prefill"}, rnd, p["engines"])
                elif sec == "q8":
                    engs = [e for e in p["engines"] if e in ("ours", "llama")]
                    self.measure(sec, dense, {"kind": "prefill", "n": 512, "reps": 3}, rnd, engs, gguf="q8_0")
                    self.measure(sec, dense, {"kind": "decode", "context": 1024, "steps": steps, "batch": 1,
                                              "fill": "prefill"}, rnd, engs, gguf="q8_0")
                elif sec == "fp8":  # the official FP8 layout against our bf16 and llama.cpp's Q8_0, same weights
                    engs = [e for e in p["engines"] if e in ("ours", "llama")]
                    engs = engs[:1] + ["ours-fp8"] + engs[1:] if "ours" in engs else engs
                    for m in [dense] + ([moe] if moe else []):
                        self.measure(sec, m, {"kind": "prefill", "n": 512, "reps": 3}, rnd, engs, gguf="q8_0",
                                     ours_quant=None)
                        self.measure(sec, m, {"kind": "decode", "context": 1024, "steps": steps, "batch": 1,
                                              "fill": "prefill"}, rnd, engs, gguf="q8_0", ours_quant=None)
                elif sec == "gguf":  # llama.cpp's own files in both engines: ours keeps their blocks
                    engs = (["ours-gguf"] if "ours" in p["engines"] else []) + [e for e in p["engines"] if e == "llama"]
                    for m in [dense] + ([moe] if moe else []):
                        for g in GGUF_AGREE if rnd == 0 else ():  # top-1 agreement: deterministic, one round
                            agree = engs + (["ours-gguf-exact"] if "ours-gguf" in engs else [])
                            self.measure(sec, m, {"kind": "agree", "n": 256}, rnd, agree, gguf=g, ours_quant=None)
                        for g in GGUF_SPEED:
                            self.measure(sec, m, {"kind": "prefill", "n": 512, "reps": 3}, rnd, engs, gguf=g,
                                         ours_quant=None)
                            self.measure(sec, m, {"kind": "decode", "context": 1024, "steps": steps, "batch": 1,
                                                  "fill": "prefill"}, rnd, engs, gguf=g, ours_quant=None)
                elif sec == "screen":  # what the greedy head screen is worth: ours with it off, same rounds
                    engs = [e for e in p["engines"] if e in ("ours", "llama")]
                    engs = engs[:1] + ["ours-fullhead"] + engs[1:] if "ours" in engs else engs
                    self.measure(sec, dense, {"kind": "decode", "context": 1024, "steps": steps, "batch": 1,
                                              "fill": "prefill"}, rnd, engs)
                elif sec == "e2e":
                    for c, b in ((1024, 1), (p["batch_context"], max(p["batches"]))):
                        self.measure(sec, dense, {"kind": "e2e", "context": c, "steps": steps, "batch": b}, rnd,
                                     ["ours"])


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_stat() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine since boot."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    busy = sum(v[:8]) - idle if len(v) >= 8 else sum(v) - idle
    return float(busy), float(busy + idle)


def cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs busy over the next `seconds` (this process sleeps meanwhile)."""
    b0, t0 = proc_stat()
    time.sleep(seconds)
    b1, t1 = proc_stat()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def summarize(res: dict) -> str:
    if res.get("error"):
        return f"{res['engine']}: {res['error'][:300]}"
    t = res["task"]
    parts = [f"rss {res.get('rss_mb', 0):.0f} MB", f"load {res.get('load_s', 0):.1f} s",
             f"others used {res.get('others_cpu', 0):.0%} of the CPUs"]
    if "prefill_s" in res:
        n = t.get("n") or t.get("context", 0) * t.get("batch", 1)
        parts.insert(0, f"prefill {n / statistics.median(res['prefill_s']):.1f} tok/s")
    if "step_s" in res:
        parts.insert(0, f"decode {t.get('batch', 1) / statistics.median(res['step_s']):.2f} tok/s")
    if "argmax" in res:
        parts.insert(0, f"greedy tokens at {len(res['argmax'])} positions")
    return f"{ENGINE_NAMES.get(res['engine'], res['engine'])}: " + ", ".join(parts)


# ----------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    from bench import models, report

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else models.default_cache_dir()
    # The published page is written by the default and --full runs; --quick / --sections / --models runs (checks
    # while working on a fast path) write next to the checkpoints unless --out says otherwise.
    partial = args.quick or args.sections or args.models
    if args.out == "-":
        out = None
    elif args.out:
        out = Path(args.out)
    else:
        out = (cache / "report" / "benchmarks.md") if partial and not args.report_only else \
            REPO / "docs" / "benchmarks.md"
    results_path = Path(args.results) if args.results else (
        (out.parent / "benchmarks" / "results.json") if out else cache / "results.json")
    if args.report_only:
        data = json.loads(results_path.read_text())
        if out:
            report.write(data, out)
            print(f"wrote {out}")
        return 0
    plan = make_plan(args)
    cache.mkdir(parents=True, exist_ok=True)
    logf = open(cache / "last-run.log", "w")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        logf.write(line + "\n")
        logf.flush()

    command = getattr(args, "_command", None) or " ".join(["qwen35 bench", *(shlex.quote(a) for a in sys.argv[2:])])
    log(f"plan: {json.dumps(plan)}")
    started = time.time()
    data = {"command": command, "plan": plan, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "loadavg_start": os.getloadavg(), "machine": machine_info(), "cache": str(cache)}
    runner = Runner(plan, cache, args.converter, args.timeout, log)
    try:
        runner.run()
    finally:
        data.update(results=runner.results, notes=runner.notes, loadavg_end=os.getloadavg(),
                    duration_s=time.time() - started)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(data, indent=1))
        log(f"results: {results_path}")
    text = report.summary_text(data)
    print(text)
    if out:
        report.write(data, out)
        log(f"report: {out}")
    return 0


def build_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = build_args(argv)
    args._command = " ".join(["python -m bench", *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
