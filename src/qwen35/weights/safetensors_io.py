"""Finding and opening safetensors checkpoints (single file or sharded with an index), memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names each offending tensor or file."""


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"broken index {index}: {type(e).__name__}: {e}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"broken index {index}: weight_map is not an object")
        files = {}
        missing_files = sorted({f for f in weight_map.values() if not (folder / f).exists()})
        if missing_files:
            raise CheckpointError(f"index {index} names shard files that do not exist: {', '.join(missing_files)}")
        for shard in sorted(set(weight_map.values())):
            with safe_open(folder / shard, "pt") as f:
                in_shard = set(f.keys())
            wanted = {n for n, s in weight_map.items() if s == shard}
            absent = sorted(wanted - in_shard)
            if absent:
                raise CheckpointError(f"index {index} lists tensors that shard {shard} does not hold: "
                                      f"{', '.join(absent[:20])}{' ...' if len(absent) > 20 else ''}")
            for n in in_shard - wanted:
                # A tensor in a shard but not in the index: still part of the checkpoint.
                files.setdefault(n, folder / shard)
        files.update({n: folder / s for n, s in weight_map.items()})
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors files in {folder} (use load_format='dummy' for random weights)")
    files = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for n in f.keys():
                if n in files:
                    raise CheckpointError(f"tensor {n} appears in both {files[n].name} and {shard.name}")
                files[n] = shard
    return files


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype string), read from headers only."""
    out = {}
    by_file: dict[Path, list[str]] = {}
    for n, p in files.items():
        by_file.setdefault(p, []).append(n)
    for p, names in by_file.items():
        with safe_open(p, "pt") as f:
            for n in names:
                sl = f.get_slice(n)
                out[n] = (tuple(sl.get_shape()), sl.get_dtype())
    return out
