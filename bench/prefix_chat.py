"""A 10-turn chat with a long system prompt and tools, prefix cache on against off, in one process.

    python -m bench.prefix_chat [--model PATH] [--turns 10] [--system-tokens 2000] [--out FILE.md]

Each turn appends a user message to the conversation and asks for a short answer; the answer (as the template
renders it back) joins the conversation. Both engines get the same conversation, turn by turn (their turns
interleaved, so that machine drift hits both alike), with thinking off and then on. Reported per turn: the
time to first token of each engine, the prompt tokens, the tokens the cached engine took from its cache and
so did not compute, and at the end the cache's hit rate and the memory its GDN snapshots held. The model is
random (the bench's 0.8B checkpoint in bf16, or `--load-format dummy` in its shape): the answers are
gibberish, the work is real.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench.host import cpu_name

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an had they you were their one all we can her has there been if more when will would who so no").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


TOOLS = [
    {"type": "function", "function": {"name": "search_docs", "description": "Search the product documentation.",
                                      "parameters": {"type": "object", "properties": {
                                          "query": {"type": "string"}, "limit": {"type": "integer"}},
                                          "required": ["query"]}}},
    {"type": "function", "function": {"name": "open_ticket", "description": "Open a support ticket.",
                                      "parameters": {"type": "object", "properties": {
                                          "title": {"type": "string"}, "severity": {"type": "string",
                                                                                    "enum": ["low", "high"]}},
                                          "required": ["title"]}}},
]


def run(args) -> str:
    import qwen35
    from qwen35 import SamplingParams

    torch.set_num_threads(args.threads)
    model = qwen35.load_model(args.model, dtype=torch.bfloat16, load_format=args.load_format, progress=False)
    engines = {on: qwen35.LLM(model, kv_cache_memory_bytes=args.cache_bytes, enable_prefix_caching=on,
                              max_num_batched_tokens=args.chunk) for on in (True, False)}
    tok = engines[True].get_tokenizer()
    rng = random.Random(0)
    system = _text(rng, args.system_tokens)
    while len(tok.encode(system)) < args.system_tokens:
        system += " " + _text(rng, 50)
    params = SamplingParams(temperature=0, max_tokens=args.answer_tokens, ignore_eos=True)
    slot = engines[True].engine.plan.region_bytes  # a snapshot takes one region of the pool
    rows: list[str] = []
    summary: list[str] = []
    for thinking in (False, True):
        convs = {on: [{"role": "system", "content": system}] for on in engines}
        ttft: dict[bool, list[float]] = {True: [], False: []}
        for turn in range(args.turns):
            question = f"Question {turn + 1}: " + _text(rng, 20 + 7 * turn)
            cells = {}
            for on in (True, False) if turn % 2 == 0 else (False, True):
                llm, conv = engines[on], convs[on]
                conv.append({"role": "user", "content": question})
                t0 = time.perf_counter()
                out = llm.chat(conv, params, tools=TOOLS, use_tqdm=False,
                               chat_template_kwargs={"enable_thinking": thinking})[0]
                wall = time.perf_counter() - t0
                first = out.metrics.get("time_to_first_token", wall)
                ttft[on].append(first)
                c = out.outputs[0]
                answer = {"role": "assistant", "content": c.content or ""}
                if c.reasoning_content:
                    answer["reasoning_content"] = c.reasoning_content
                conv.append(answer)
                cells[on] = (first, len(out.prompt_token_ids), out.num_cached_tokens or 0)
            (t_on, n, cached), (t_off, _, _) = cells[True], cells[False]
            rows.append(f"| {'on' if thinking else 'off'} | {turn + 1} | {n} | {cached} | {n - cached} | "
                        f"{t_off * 1e3:.0f} | {t_on * 1e3:.0f} | {t_off / t_on:.1f}x |")
        later = [a / b for a, b in zip(ttft[False][1:], ttft[True][1:], strict=True)]
        summary.append(f"- thinking {'on' if thinking else 'off'}: TTFT cache off / cache on from turn 2: median "
                       f"{statistics.median(later):.1f}x, min {min(later):.1f}x")
    stats = engines[True].engine.prefix_cache_stats()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Prefix cache: a 10-turn chat, cache on against off",
        "",
        f"Generated by `{' '.join(['python -m bench.prefix_chat', *args.argv])}` (qwen35 {commit}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) on {cpu_name()}, {args.threads} threads, "
        f"torch {torch.__version__}. Model: `{args.model}` ({args.load_format}, random weights, bf16); a system "
        f"prompt of {args.system_tokens}+ tokens, two tools, {args.answer_tokens}-token answers (greedy); both "
        "engines share the model and take their turns interleaved.",
        "",
        "| thinking | turn | prompt tokens | cached (not computed) | computed | TTFT off, ms | TTFT on, ms | "
        "off / on |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *summary,
        f"- hit rate over both chats: {100 * stats['hit_tokens'] / max(stats['queried_tokens'], 1):.1f}% of "
        f"{stats['queried_tokens']} prompt tokens; at the end {stats['snapshots']} GDN snapshots "
        f"({stats['snapshots'] * slot / 2**20:.0f} MiB, {slot / 2**20:.1f} MiB each) and {stats['cached_blocks']} "
        "cached KV blocks",
        "- With thinking on, the template drops earlier turns' reasoning, so a turn's prompt differs from what "
        "was computed from the start of the previous answer on: the hit reaches the grid point before it.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen3.5-0.8B")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--system-tokens", type=int, default=2000)
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=4096, help="max_num_batched_tokens")
    p.add_argument("--cache-bytes", type=int, default=2 << 30)
    p.add_argument("--out", default="docs/benchmarks/prefix-cache.md")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.argv = argv
    text = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
