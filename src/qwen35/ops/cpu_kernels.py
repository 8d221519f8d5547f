"""The compiled CPU kernels (csrc/): built for this machine on first use, each with a torch twin.

`kernels()` returns the extension module, or None when disabled (QWEN35_CPU_KERNELS=0 or
`set_enabled(False)`) or when it cannot be built (no compiler: logged once). Callers then use their
torch twin, which gives the same numbers, only slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger("qwen35")

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_enabled = os.environ.get("QWEN35_CPU_KERNELS", "1") != "0"
SOURCES = ("gemv.cpp", "gemv_amx.cpp", "attention.cpp", "gdn.cpp", "norm.cpp", "conv.cpp", "gdn_prefill.cpp",
           "moe.cpp", "attention_prefill.cpp", "fp8.cpp", "gguf.cpp")


def set_enabled(enabled: bool) -> bool:
    """Switch the kernels on or off (tests hold both paths together); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def build() -> ModuleType | None:
    """The extension module, building it if needed, regardless of the on/off switch."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                from torch.utils.cpp_extension import _get_build_directory, load

                csrc = Path(__file__).parent / "csrc"
                # one build folder per checkout: with a shared name, two checkouts (a clone under test next to
                # the working tree) rebuild over each other's build on every switch (~2.5 min on 2 cores)
                tag = hashlib.sha1(str(csrc.resolve()).encode()).hexdigest()[:8]
                name = f"qwen35_cpu_kernels_{tag}"
                build_dir = Path(_get_build_directory(name, verbose=False))
                _clear_stale_lock(build_dir)
                if not _is_built(build_dir, name, csrc):
                    # a newcomer's first run would otherwise sit silent for minutes (measured: 5-6 min on 2 cores)
                    log.warning("qwen35: compiling the CPU kernels for this machine (once; about %d minute(s) on %d "
                                "cores)...", max(1, round(11 / max(1, os.cpu_count() or 1))), os.cpu_count() or 1)
                _module = load(name=name, sources=[str(csrc / s) for s in SOURCES],
                               extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
            except Exception as e:  # no compiler / ninja: the torch twins still give the same numbers
                log.warning("qwen35: CPU kernels unavailable, using torch ops (slower): %s", e)
                _module = None
            _tried = True
    return _module


# A build holds `lock` in its folder while it compiles (torch's FileBaton) and removes it at the end; a build that
# was killed leaves it behind, and every later build then waits for it forever. A real build takes 5-6 minutes
# on 2 cores, so a lock this much older is taken as left behind.
STALE_LOCK_S = 15 * 60


def _clear_stale_lock(build_dir: Path) -> None:
    """Wait while another process builds (its lock is fresh); remove a lock older than STALE_LOCK_S."""
    lock = build_dir / "lock"
    told = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_S:
            log.warning("qwen35: removing %s, left %d minutes ago by a build that did not finish", lock, age // 60)
            lock.unlink(missing_ok=True)
            return
        if not told:
            log.warning("qwen35: another process is compiling the CPU kernels (%s); waiting for it", lock)
            told = True
        time.sleep(1.0)


def _is_built(build_dir: Path, name: str, csrc: Path) -> bool:
    """Whether a build of the current sources exists (torch rebuilds when a source is newer than the library)."""
    lib = build_dir / f"{name}.so"
    if not lib.is_file():
        return False
    newest = max(p.stat().st_mtime for p in csrc.iterdir() if p.suffix in (".cpp", ".h"))
    return lib.stat().st_mtime >= newest


def kernels() -> ModuleType | None:
    return build() if _enabled else None


# Intra-op thread count flushed, per calling thread: OpenMP (libgomp) gives each thread that opens parallel regions
# a worker pool of its own, so the server's engine thread has other workers than the main thread that loaded the
# model (with one count for the process, those workers were never flushed).
_flushed_threads: dict[int, int] = {}


def flush_denormals() -> None:
    """Flush subnormal floats to zero on every intra-op thread of the calling thread's pool (see csrc/gemv.cpp).
    Cheap after the first call: redone only for a new calling thread or a changed thread count."""
    import torch

    torch.set_flush_denormal(True)
    n = torch.get_num_threads()
    me = threading.get_ident()
    if _flushed_threads.get(me) != n:
        module = build()
        if module is not None:
            module.flush_denormals_all_threads()
        _flushed_threads[me] = n
