"""Decoding as users run it: sampled at the model card's settings, many sequences, through `LLM` and the server.

    python -m bench.sampling [--batches 1,16] [--prompt 512] [--tokens 32] [--rounds 2] [--server]
                             [--out docs/benchmarks/sampling.md]

Model: the Qwen3.5-0.8B shape with random weights in bf16 (the benchmark checkpoint of bench/models.py), and its
GGUF conversion in BF16 for llama.cpp (llama-cpp-python, the same file's weights). Every batch decodes B random
prompts of `--prompt` tokens, `--tokens` tokens each (`ignore_eos`), in these settings:

* *greedy*: temperature 0;
* *card*: the model card's thinking-mode settings, temperature 0.6, top_p 0.95, top_k 20, seeded;
* *card + presence*: the same with presence_penalty 1.5;
* *no top_k*: temperature 0.6, top_p 0.95 (the full-logit path; for reference).

Engines, all in this process, one after the other within each round (this host's memory bandwidth drifts within
minutes: only figures of one round compare, and each ratio below is the median of its rounds' ratios):

* *bare*: the model alone (bench.engines.Ours: the engine's allocator and model runner, greedy through the head
  screen, nothing else), for the engine's overhead;
* *LLM*: `qwen35.LLM.generate` with `SamplingParams`, the engine end to end;
* *llama.cpp*: `llama_decode` over B sequences of one context, each sampled by its own llama.cpp sampler chain
  (penalties, top_k, top_p, temp, dist: llama.cpp's order), greedy by the argmax of the logits it returns;
* *server* (`--server`): `qwen35 serve` in a process of its own, B concurrent streaming `openai` clients on
  `/v1/completions` with the same prompts (token ids) and settings.

Decode tok/s is B over the median decode step: for *LLM* the interval between two engine steps (everything the
engine and `LLM.generate` do between them included), for *bare* and *llama.cpp* one step's call, for the server
the tokens all B streams received while all of them were decoding over that time. The median keeps steps
that other processes on this shared host slowed down out of the figure. *Compute limit*: the rate of the engine's
GEMM for many rows on this host (`qwen35.ops.linear.linear`, a [2048, 1024] x [1024, 3584] bf16 product, timed
here) over the model's multiply-adds per token.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.host import cpu_name

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "card": dict(temperature=0.6, top_p=0.95, top_k=20),
    "card + presence": dict(temperature=0.6, top_p=0.95, top_k=20, presence_penalty=1.5),
    "no top_k": dict(temperature=0.6, top_p=0.95),
}


def _prompts(b: int, n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed + b)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for _ in range(b)]


# ------------------------------------------------------------------------------------------------ engines
class LLMRun:
    """`qwen35.LLM` on the checkpoint; step intervals recorded around the scheduler."""

    def __init__(self, folder: Path, threads: int, max_seqs: int):
        import torch

        import qwen35

        torch.set_num_threads(threads)
        self.llm = qwen35.LLM(str(folder), dtype="bfloat16", max_num_seqs=max_seqs, kv_cache_memory_bytes=3 << 30,
                              enable_prefix_caching=False)
        self.marks: list[tuple[float, int]] = []  # (time schedule() began, tokens it scheduled)
        sched = self.llm.engine.scheduler
        real = sched.schedule

        def timed():
            t = time.perf_counter()
            work = real()
            self.marks.append((t, sum(work.num_tokens)))
            return work

        sched.schedule = timed

    def decode_tps(self, prompts: list[list[int]], tokens: int, setting: dict, seed: int) -> float:
        from qwen35 import SamplingParams

        sp = SamplingParams(max_tokens=tokens, ignore_eos=True, seed=None if not setting.get("temperature") else seed,
                            **setting)
        self.marks.clear()
        self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        b = len(prompts)
        # steps that decode every sequence (one token each), timed to the start of the next step
        steps = [t1 - t0 for (t0, n), (t1, _) in zip(self.marks, self.marks[1:], strict=False) if n == b]
        if not steps:  # a short run (the warm-up) whose decode steps all came with prompt chunks
            return float("nan")
        return b / statistics.median(steps[1:] or steps)


class BareRun:
    def __init__(self, folder: Path, threads: int):
        from bench.engines import Ours

        self.eng = Ours(str(folder), threads)

    def decode_tps(self, prompts: list[list[int]], tokens: int) -> float:
        self.eng.open(len(prompts), len(prompts[0]) + tokens)
        nxt = self.eng.prefill_all(prompts)
        times = []
        for _ in range(tokens):
            t0 = time.perf_counter()
            nxt = self.eng.step(nxt)
            times.append(time.perf_counter() - t0)
        self.eng.run = None
        return len(prompts) / statistics.median(times[1:])


class LlamaRun:
    def __init__(self, gguf: Path, threads: int):
        from bench.engines import Llama

        self.eng = Llama(str(gguf), threads)
        self.lc = self.eng.lc

    def _chain(self, setting: dict, seed: int):
        lc = self.lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if setting.get("presence_penalty"):
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
                self.eng.n_vocab, 64, 1.0, 0.0, setting["presence_penalty"]))
        if setting.get("top_k"):
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(setting["top_k"]))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(setting["top_p"], 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(setting["temperature"]))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def decode_tps(self, prompts: list[list[int]], tokens: int, setting: dict, seed: int) -> float:
        eng, lc = self.eng, self.lc
        b = len(prompts)
        eng.open(b, len(prompts[0]) + tokens)
        nxt = eng.prefill_all(prompts)
        greedy = not setting.get("temperature")
        chains = [] if greedy else [self._chain(setting, seed + i) for i in range(b)]
        times = []
        try:
            for _ in range(tokens):
                t0 = time.perf_counter()
                if greedy:
                    nxt = eng.step(nxt)
                else:
                    items = [(s, t, True) for s, t in enumerate(nxt)]
                    bt = eng.batch
                    bt.n_tokens = b
                    for j, (s, t, _) in enumerate(items):
                        bt.token[j], bt.pos[j], bt.n_seq_id[j], bt.logits[j] = t, eng.pos[s], 1, True
                        bt.seq_id[j][0] = s
                        eng.pos[s] += 1
                    if lc.llama_decode(eng.ctx, bt) != 0:
                        raise RuntimeError("llama_decode failed")
                    nxt = [lc.llama_sampler_sample(chains[j], eng.ctx, j) for j in range(b)]
                times.append(time.perf_counter() - t0)
        finally:
            for c in chains:
                lc.llama_sampler_free(c)
        return b / statistics.median(times[1:])


class ServerRun:
    """`qwen35 serve` in its own process; B streaming openai clients at once."""

    def __init__(self, folder: Path, threads: int, max_seqs: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen35", "serve", str(folder), "--port", str(self.port), "--dtype", "bfloat16",
             "--max-num-seqs", str(max_seqs), "--kv-cache-memory-bytes", str(3 << 30), "--no-enable-prefix-caching",
             "--served-model-name", "m", "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qwen35 serve exited: {self.proc.stderr.read()[-3000:]}")
            try:
                self.client.models.list()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def decode_tps(self, prompts: list[list[int]], tokens: int, setting: dict, seed: int) -> float:
        stamps: list[list[float]] = [[] for _ in prompts]
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                extra = {"ignore_eos": True}
                if setting.get("top_k"):
                    extra["top_k"] = setting["top_k"]
                stream = self.client.completions.create(
                    model="m", prompt=prompts[i], max_tokens=tokens, stream=True,
                    temperature=setting.get("temperature", 0.0), top_p=setting.get("top_p", 1.0),
                    presence_penalty=setting.get("presence_penalty", 0.0),
                    seed=seed + i if setting.get("temperature") else None, extra_body=extra)
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text is not None:
                        stamps[i].append(time.perf_counter())
            except BaseException as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        t0 = max(s[0] for s in stamps)  # every stream decoding from here ...
        t1 = min(s[-1] for s in stamps)  # ... to here
        n = sum(sum(1 for x in s if t0 < x <= t1) for s in stamps)
        return n / (t1 - t0)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ------------------------------------------------------------------------------------------------ the run
def compute_limit_tps(threads: int) -> tuple[float, float]:
    """(this host's bf16 GEMM GFLOP/s on `threads` threads, the 0.8B shape's decode tokens/s at that rate)."""
    import torch

    from qwen35.config import PRESET_DICTS
    from qwen35.ops.linear import linear

    torch.set_num_threads(threads)
    a = torch.randn(2048, 1024, dtype=torch.bfloat16)
    w = torch.randn(3584, 1024, dtype=torch.bfloat16)
    linear(a, w)  # the engine's own GEMM for many rows (oneDNN bf16, or fp32 tiles where bf16 GEMMs are slow)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        linear(a, w)
        times.append(time.perf_counter() - t0)
    gflops = 2 * 2048 * 1024 * 3584 / min(times) / 1e9
    t = PRESET_DICTS["Qwen3.5-0.8B"]["text_config"]
    H, L, V = t["hidden_size"], t["num_hidden_layers"], t["vocab_size"]
    # linear weights per layer (GDN and attention layers differ; their mean over the 3:1 pattern) + MLP + head
    kh, vh, dk, dv = t["linear_num_key_heads"], t["linear_num_value_heads"], t["linear_key_head_dim"], \
        t["linear_value_head_dim"]
    gdn = H * (2 * kh * dk + 2 * vh * dv + 2 * vh) + vh * dv * H
    qh, kvh, hd = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    attn = H * (2 * qh * hd + 2 * kvh * hd) + qh * hd * H
    mlp = 3 * H * t["intermediate_size"]
    per_token = 2 * (L * (0.75 * gdn + 0.25 * attn + mlp) + V * H)
    return gflops, gflops * 1e9 / per_token


def measure(args) -> dict:
    from bench.models import default_cache_dir, make_checkpoint, make_gguf

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    folder = make_checkpoint(cache, "0.8b")
    gguf = make_gguf(cache, "0.8b", "bf16", args.converter) if not args.no_llama else None
    vocab = 248044
    max_b = max(args.batches)
    gflops, limit = compute_limit_tps(args.threads)
    print(f"[sampling] bf16 GEMM {gflops:.0f} GFLOP/s -> compute limit {limit:.0f} tok/s", file=sys.stderr)
    llm = LLMRun(folder, args.threads, max_b)
    bare = BareRun(folder, args.threads)
    llama = LlamaRun(gguf, args.threads) if gguf is not None else None
    server = ServerRun(folder, args.threads, max_b) if args.server else None
    settings = [s for s in SETTINGS if s in args.settings]
    res: dict = {"gemm_gflops": gflops, "limit_tps": limit, "rows": []}
    try:
        for b in args.batches:
            prompts = _prompts(b, args.prompt, vocab)
            # warm-up: kernels compiled, the batch's shapes seen once
            llm.decode_tps(prompts, 3, SETTINGS["card"], 0)
            for r in range(args.rounds):
                row: dict = {"batch": b, "round": r, "bare": bare.decode_tps(prompts, args.tokens)}
                for s in settings:
                    row[("LLM", s)] = llm.decode_tps(prompts, args.tokens, SETTINGS[s], 1000 * r)
                    if llama is not None and s in args.llama_settings:
                        row[("llama.cpp", s)] = llama.decode_tps(prompts, args.tokens, SETTINGS[s], 1000 * r)
                    if server is not None and b in args.server_batches and s in args.llama_settings:
                        row[("server", s)] = server.decode_tps(prompts, args.tokens, SETTINGS[s], 1000 * r)
                print("[sampling]", {str(k): round(v, 2) for k, v in row.items()}, file=sys.stderr, flush=True)
                res["rows"].append(row)
    finally:
        if server is not None:
            server.close()
    return res


def _med(rows: list[dict], key) -> float | None:
    xs = [r[key] for r in rows if key in r]
    return statistics.median(xs) if xs else None


def _ratio(rows: list[dict], a, b) -> float | None:
    xs = [r[a] / r[b] for r in rows if a in r and b in r]
    return statistics.median(xs) if xs else None


def _fx(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def markdown(res: dict, args, cmd: str) -> str:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    try:
        import llama_cpp

        lv = f", llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        lv = ""
    lines = ["# Sampled decoding, many sequences, the engine and the server", "",
             f"Generated by `{cmd}` (qwen35 {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) on "
             f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}{lv}. Prompts of {args.prompt} "
             f"tokens, {args.tokens} decoded per sequence, {args.rounds} rounds.", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             f"This host's bf16 GEMM: {res['gemm_gflops']:.0f} GFLOP/s, so the compute limit of the 0.8B shape's "
             f"decode is about {res['limit_tps']:.0f} tok/s.", "",
             "## Decode tok/s (medians of the rounds)", "",
             "| batch | setting | bare | LLM | LLM / greedy LLM | LLM / bare | llama.cpp | LLM / llama.cpp "
             "| server | server / LLM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    settings = [s for s in SETTINGS if s in args.settings]
    for b in args.batches:
        rows = [r for r in res["rows"] if r["batch"] == b]
        for s in settings:
            lines.append(" | ".join([
                f"| {b}", s, _f(_med(rows, "bare")) if s == "greedy" else "",
                _f(_med(rows, ("LLM", s))), _fx(_ratio(rows, ("LLM", s), ("LLM", "greedy"))),
                _fx(_ratio(rows, ("LLM", s), "bare")),
                _f(_med(rows, ("llama.cpp", s))), _fx(_ratio(rows, ("LLM", s), ("llama.cpp", s))),
                _f(_med(rows, ("server", s))), _fx(_ratio(rows, ("server", s), ("LLM", s)))]) + " |")
        greedy = _med(rows, ("LLM", "greedy"))
        if greedy:
            lines.append(f"| {b} | (greedy LLM / compute limit) | | {100 * greedy / res['limit_tps']:.0f}% "
                         "| | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    p.add_argument("--llama-settings", default="greedy,card,card + presence")
    p.add_argument("--server", action="store_true", help="also the server with B streaming openai clients")
    p.add_argument("--server-batches", default="16")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--converter", default=None)
    p.add_argument("--json", default=None, help="also write the raw figures here")
    p.add_argument("--out", default="docs/benchmarks/sampling.md")
    args = p.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.server_batches = [int(x) for x in args.server_batches.split(",")]
    args.settings = args.settings.split(",")
    args.llama_settings = args.llama_settings.split(",")
    res = measure(args)
    cmd = "python -m bench.sampling" + ("" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        cmd += " " + " ".join(f"'{a}'" if " " in a else a for a in sys.argv[1:])
    text = markdown(res, args, cmd)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "rows": [{str(k): v for k, v in r.items()}
                                                               for r in res["rows"]]}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
