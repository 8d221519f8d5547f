"""`qwen35 generate MODEL PROMPT`: complete one prompt, streamed to the terminal.

    qwen35 generate Qwen/Qwen3.5-0.8B "The capital of France is" --max-tokens 32 --temperature 0
    echo "Once upon a time" | qwen35 generate ./my-model - --load-format dummy

Sampling flags left out take the checkpoint's defaults (generation_config.json). `--chat` wraps the prompt in
the chat template as one user message (the reasoning, if any, is part of the printed text).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The model and how to load and hold it: shared by `generate`, `chat` and `serve`."""
    p.add_argument("model", help="checkpoint folder, hub id (org/name), a GGUF file (x.gguf, the first of split "
                                 "files), or with --load-format dummy a preset name or a folder holding only "
                                 "config.json")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"],
                   help="'dummy': random weights, no weight files needed (default: auto)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default: bf16 on GPU "
                                                   "and for FP8 weights and GGUF files, else fp32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--quantization", default=None, choices=["int8", "fp8"],
                   help="weight-only quantisation of the linear layers made at load (int8: per-row scales; fp8: "
                        "e4m3 in 128x128 blocks, as the official FP8 checkpoints, which need no flag)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens of one request "
                                                                    "(default: the model's, capped by the cache)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="cache budget in bytes")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="start requests from the cached KV blocks and GDN state of earlier ones with the same "
                        "first tokens (default: on; --no-enable-prefix-caching turns it off)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many processes on this host (gloo on CPU; default 1)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size: MoE layers split by expert instead of inside every expert")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="MTP speculative decoding with the checkpoint's own MTP layer, vLLM's form: "
                        "'{\"method\": \"mtp\", \"num_speculative_tokens\": 2}' (1-4 drafts a step; the same "
                        "tokens as without it)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `generate` and `chat`."""
    add_engine_arguments(p)
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random per run)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("prompt", help="the prompt text ('-': read it from stdin)")
    p.add_argument("--chat", action="store_true", help="apply the chat template (one user message)")
    p.add_argument("--no-think", action="store_true", help="with --chat: enable_thinking=false")


def build_llm(args: argparse.Namespace) -> Any:
    from qwen35 import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
               max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
               max_num_seqs=8, seed=args.seed if args.seed is not None else 0, quantization=args.quantization,
               enable_prefix_caching=args.enable_prefix_caching, tensor_parallel_size=args.tensor_parallel_size,
               enable_expert_parallel=args.enable_expert_parallel, speculative_config=args.speculative_config)


def sampling_params(llm: Any, args: argparse.Namespace, default_max_tokens: int) -> Any:
    """The checkpoint's defaults, overridden by the flags given."""
    import random

    changes: dict[str, Any] = {"max_tokens": args.max_tokens if args.max_tokens is not None else default_max_tokens,
                               "output_kind": "delta", "ignore_eos": args.ignore_eos}
    for flag in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty"):
        v = getattr(args, flag)
        if v is not None:
            changes[flag] = v
    changes["seed"] = args.seed if args.seed is not None else random.randrange(2**31)
    if args.stop:
        changes["stop"] = args.stop
    return llm.get_default_sampling_params().clone(**changes)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = build_llm(args)
    params = sampling_params(llm, args, default_max_tokens=256)
    out = sys.stdout
    if args.chat:
        kwargs = {"enable_thinking": False} if args.no_think else {}
        stream = llm.chat_stream([{"role": "user", "content": prompt}], params, chat_template_kwargs=kwargs)
    else:
        stream = llm.generate_stream(prompt, params)
    finish = None
    for delta in stream:
        for c in delta.outputs:
            out.write(c.text)
            finish = c.finish_reason or finish
        out.flush()
    out.write("\n")
    out.flush()
    if finish == "length":
        print(f"[stopped at the length limit: max_tokens={params.max_tokens} or max_model_len]", file=sys.stderr)
    return 0
