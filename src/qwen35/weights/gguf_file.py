"""A lean reader of the GGUF container: metadata and tensor directory parsed in one pass, tensor bytes read on demand.

`gguf.GGUFReader` builds a numpy view per metadata part: on a Qwen3.5 file (248,320 vocabulary strings, and as
many scores and types) opening it takes ~13 s. The container is simple (ggml's docs/gguf.md): a header (magic
"GGUF", version 2 or 3, tensor count, metadata count), the metadata (key, type, value), the tensor directory (name,
dims innermost first, type, offset from the data start), then the data at `general.alignment` (32 by default).
This module parses that with `struct` (~0.4 s) and leaves the tensor bytes on disk: `read_into` copies one tensor
straight into its final buffer (plain reads: nothing mapped stays counted in the process's memory). Types, block
sizes and widening come from the `gguf` package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen35.weights.safetensors_io import CheckpointError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): the reverse of the file's dims
    type_id: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    n_bytes: int
    path: Path

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type {self.type_id}"

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def read(self) -> np.ndarray:
        """The tensor's bytes (uint8, [n_bytes])."""
        out = np.empty(self.n_bytes, dtype=np.uint8)
        self.read_into(memoryview(out))
        return out

    def read_into(self, buf, start: int = 0) -> None:
        """Copy the tensor's bytes [start, start + len(buf)) into a writable buffer (all of them by default)."""
        mv = memoryview(buf).cast("B")
        if start < 0 or start + mv.nbytes > self.n_bytes:
            raise ValueError(f"{self.name}: bytes [{start}, {start + mv.nbytes}) of a tensor of {self.n_bytes}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start)
            done = 0
            while done < mv.nbytes:
                got = f.readinto(mv[done:])
                if not got:
                    raise CheckpointError(f"{self.path}: tensor {self.name} is cut short (file truncated)")
                done += got


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise CheckpointError(f"{self.path}: GGUF header is cut short (truncated file?)")
        v = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.data):
            raise CheckpointError(f"{self.path}: GGUF header is cut short (truncated file?)")
        s = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            elem, n = self.take("<I"), self.take("<Q")
            if elem in _NUMPY:
                dt = np.dtype(_NUMPY[elem]).newbyteorder("<")
                end = self.pos + n * dt.itemsize
                if end > len(self.data):
                    raise CheckpointError(f"{self.path}: GGUF header is cut short (truncated file?)")
                arr = np.frombuffer(self.data, dtype=dt, count=n, offset=self.pos)
                self.pos = end
                return arr.tolist()
            if elem == _STRING:
                return self._strings(n)
            return [self.value(elem) for _ in range(n)]
        raise CheckpointError(f"{self.path}: unknown GGUF metadata type {kind} at byte {self.pos}")

    def _strings(self, n: int) -> list[str]:
        """n length-prefixed strings in one tight loop (a Qwen3.5 vocabulary and its merges: ~700k of them)."""
        data, pos, end = self.data, self.pos, len(self.data)
        length = _U64.unpack_from
        out = []
        for _ in range(n):
            if pos + 8 > end:
                raise CheckpointError(f"{self.path}: GGUF header is cut short (truncated file?)")
            (k,) = length(data, pos)
            pos += 8
            if pos + k > end:
                raise CheckpointError(f"{self.path}: GGUF header is cut short (truncated file?)")
            out.append(data[pos:pos + k].decode("utf-8", errors="replace"))
            pos += k
        self.pos = pos
        return out


class GGUFFile:
    """One .gguf file: `fields` (metadata key -> python value), `tensors` (in file order)."""

    def __init__(self, path: str | Path):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(24)
                if len(head) < 4 or head[:4] != b"GGUF":
                    raise CheckpointError(f"{self.path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
                if len(head) < 24:
                    raise CheckpointError(f"{self.path}: GGUF header is cut short (truncated file?)")
                version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
                if version not in (2, 3):
                    raise CheckpointError(f"{self.path}: GGUF version {version} (this reader knows 2 and 3)")
                # the header's size is unknown until parsed: read growing prefixes (metadata is a few MB at most)
                want = 1 << 22
                while True:
                    f.seek(0)
                    data = f.read(want)
                    try:
                        self._parse(data, n_tensors, n_kv, complete=len(data) >= size)
                        break
                    except _NeedMore:
                        if len(data) >= size:
                            raise CheckpointError(f"{self.path}: GGUF header is cut short (truncated file?)") from None
                        want *= 4
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e})") from None
        align = int(self.fields.get("general.alignment", 32))
        if align <= 0 or align & (align - 1):
            raise CheckpointError(f"{self.path}: general.alignment={align} is not a power of two")
        start = -(-self._end // align) * align
        tensors = []
        for name, dims, kind, rel in self._directory:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise CheckpointError(f"{self.path}: tensor {name} has GGUF type id {kind}, which this gguf "
                                      "package does not know") from None
            shape = tuple(int(d) for d in reversed(dims))
            n = 1
            for d in shape:
                n *= d
            if dims and dims[0] % block:
                raise CheckpointError(f"{self.path}: tensor {name}: {dims[0]} columns is not a multiple of the "
                                      f"{GGMLQuantizationType(kind).name} block of {block}")
            n_bytes = n // block * type_size
            offset = start + rel
            if offset + n_bytes > size:
                raise CheckpointError(f"{self.path}: tensor {name} ({n_bytes} bytes at {offset}) runs past the end "
                                      f"of the file ({size} bytes): truncated file?")
            tensors.append(GGUFTensor(name, shape, kind, offset, n_bytes, self.path))
        self.tensors: list[GGUFTensor] = tensors
        del self._directory

    def _parse(self, data: bytes, n_tensors: int, n_kv: int, complete: bool) -> None:
        c = _Cursor(data, self.path)
        c.pos = 24
        fields: dict[str, Any] = {}
        try:
            for _ in range(n_kv):
                key = c.string()
                fields[key] = c.value(c.take("<I"))
            directory = []
            for _ in range(n_tensors):
                name = c.string()
                nd = c.take("<I")
                if nd > 4:
                    raise CheckpointError(f"{self.path}: tensor {name} has {nd} dimensions (at most 4)")
                dims = [c.take("<Q") for _ in range(nd)]
                directory.append((name, dims, c.take("<I"), c.take("<Q")))
        except CheckpointError:
            if complete:
                raise
            raise _NeedMore from None
        self.fields, self._directory, self._end = fields, directory, c.pos


class _NeedMore(Exception):
    pass
