"""`qwen35 serve MODEL`: the OpenAI-compatible HTTP server.

    qwen35 serve Qwen/Qwen3.5-0.8B --port 8000 --api-key secret
    qwen35 serve ./tiny --load-format dummy --max-model-len 4096          # random weights, for trying it out

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics,
GET /openapi.json (and /docs). With --api-key every route but /health needs `Authorization: Bearer KEY`
(the key may also come from the QWEN35_API_KEY environment variable). SIGINT/SIGTERM stop accepting
connections, let the running requests finish, then exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qwen35.commands.generate import add_engine_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: "
                                                   "$QWEN35_API_KEY, or no key)")
    p.add_argument("--served-model-name", default=None, help="the name clients give as `model` (default: MODEL "
                                                             "as given)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch at most (default: 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per engine step")
    p.add_argument("--seed", type=int, default=0, help="seed of the random streams of unseeded requests")
    p.add_argument("--chat-template", default=None, help="a jinja chat template file to use instead of the "
                                                         "checkpoint's")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let requests name local image files (file:// URLs) inside DIR")
    p.add_argument("--allow-remote-media", action="store_true", help="let requests name http(s) image URLs "
                                                                     "(the server downloads them)")
    p.add_argument("--max-request-body-bytes", type=int, default=32 << 20, help="larger bodies get 413 "
                                                                                "(default: 32 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let running requests finish "
                                                                     "on shutdown (default: 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    from qwen35 import LLM
    from qwen35.server import MediaPolicy, ServerConfig, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_request_body_bytes < 1024:
        raise ValueError("--max-request-body-bytes must be at least 1024")
    media_root = None
    if args.allowed_local_media_path:
        media_root = Path(args.allowed_local_media_path).expanduser()
        if not media_root.is_dir():
            raise ValueError(f"--allowed-local-media-path {media_root} is not a folder")
    chat_template = None
    if args.chat_template:
        chat_template = Path(args.chat_template).read_text(encoding="utf-8")
    api_key = args.api_key if args.api_key is not None else os.environ.get("QWEN35_API_KEY") or None

    llm = LLM(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
              max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
              quantization=args.quantization, enable_prefix_caching=args.enable_prefix_caching,
              tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
              speculative_config=args.speculative_config)
    name = args.served_model_name or args.model
    aliases = tuple(dict.fromkeys(a for a in (args.model, str(Path(args.model).expanduser())) if a != name))
    config = ServerConfig(served_model_name=name, model_aliases=aliases, api_key=api_key,
                          media=MediaPolicy(allow_remote=args.allow_remote_media, local_root=media_root),
                          max_body_bytes=args.max_request_body_bytes, drain_timeout_s=args.drain_timeout,
                          chat_template=chat_template)
    print(f"qwen35 serve: {name} on http://{args.host}:{args.port}/v1 (max_model_len {llm.engine.max_model_len}"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    serve(llm, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
