"""Merge two runs' results.json: some sections from an older run, the rest from a newer one.

    python -m bench.merge NEW.json OLD.json --old-sections prefill,batch,moe,q8,e2e --out docs/benchmarks/results.json
    qwen35 bench --report-only

For rerunning only the sections a change touches: the report names both runs (commit, command, date) and which
sections each gave; every result keeps its own `src_hash`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.run import SECTIONS


def merge(new: dict, old: dict, old_sections: list[str], why: str = "") -> dict:
    unknown = sorted(set(old_sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}: expected some of {', '.join(SECTIONS)}")
    keep_old = set(old_sections)
    new_sections = [s for s in SECTIONS if s in new["plan"]["sections"] and s not in keep_old]
    merged = dict(new)
    merged["results"] = ([r for r in new["results"] if r.get("section") not in keep_old]
                         + [r for r in old["results"] if r.get("section") in keep_old])
    plan = dict(new["plan"], sections=[s for s in SECTIONS if s in keep_old or s in new_sections])
    for key in ("prefill", "batches", "batch_context"):  # what the old run's sections were measured with
        if key in old["plan"]:
            plan[key] = old["plan"][key]
    merged["plan"] = plan
    merged["merged"] = [
        {"commit": new["machine"].get("git", "?"), "sections": new_sections, "command": new["command"],
         "started": new["started"], "duration_s": new["duration_s"]},
        {"commit": old["machine"].get("git", "?"), "sections": [s for s in SECTIONS if s in keep_old],
         "command": old["command"], "started": old["started"], "duration_s": old["duration_s"]},
    ]
    merged["notes"] = list(new.get("notes", [])) + [
        f"Two runs merged (`python -m bench.merge`): {', '.join(new_sections)} from the run of "
        f"{new['machine'].get('git', '?')}; {', '.join(s for s in SECTIONS if s in keep_old)} from the run of "
        f"{old['machine'].get('git', '?')}." + (f" {why}" if why else "")]
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.merge", description=__doc__.split("\n")[0])
    p.add_argument("new", type=Path)
    p.add_argument("old", type=Path)
    p.add_argument("--old-sections", required=True, help=f"comma list of sections to take from OLD ({SECTIONS})")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--why", default="", help="a sentence for the report's notes: why these sections were kept")
    args = p.parse_args(argv)
    merged = merge(json.loads(args.new.read_text()), json.loads(args.old.read_text()),
                   [s.strip() for s in args.old_sections.split(",") if s.strip()], args.why)
    args.out.write_text(json.dumps(merged, indent=1))
    print(f"wrote {args.out}: {len(merged['results'])} results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
