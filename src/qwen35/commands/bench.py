"""`qwen35 bench`: our engine against transformers and llama.cpp, measured in the same run.

The harness lives in the repository's `bench/` folder (it is not part of the installed package); this verb finds it
next to the source tree of an editable install. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[3]  # src/qwen35/commands/bench.py -> the checkout


def _harness():
    if not (_ROOT / "bench" / "run.py").exists():
        return None
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    return importlib.import_module("bench.run")


def add_arguments(p: argparse.ArgumentParser) -> None:
    h = _harness()
    if h is None:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    h.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    h = _harness()
    if h is None:
        print("qwen35 bench: the benchmark harness (bench/) ships with the source checkout only: clone the "
              "repository and `pip install -e .[bench]`", file=sys.stderr)
        return 2
    return h.run(args)
