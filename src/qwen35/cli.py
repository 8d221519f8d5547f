"""The `qwen35` command: info | generate | chat | serve | bench.

Each verb lives in `qwen35.commands.<verb>` with `add_arguments(parser)` and `run(args) -> int`; a verb
whose module is not there yet is simply not offered.
"""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS = {
    "info": "parameter counts and memory figures of a model (folder, preset or hub id)",
    "generate": "generate a completion for a prompt, streamed to the terminal",
    "chat": "interactive chat",
    "serve": "OpenAI-compatible HTTP server",
    "bench": "benchmarks against the peers",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen35", description="Run the Qwen3.5 model family.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, help_text in VERBS.items():
        try:
            module = importlib.import_module(f"qwen35.commands.{verb}")
        except ModuleNotFoundError as e:
            if e.name == f"qwen35.commands.{verb}":
                continue
            raise
        p = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, bad files: one clear line, no traceback
        print(f"qwen35 {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
