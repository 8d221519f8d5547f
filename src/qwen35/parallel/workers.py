"""The ranks of a tensor-parallel engine on one host: rank 0 is the calling process (scheduler, sampler,
outputs); `WorkerGroup.start` spawns ranks 1..N-1, each loading its share of the model and then running what
rank 0 broadcasts: every step's forward (`ModelRunner.execute` on a `StepInput`) and every cache copy, in the
same order, so that all ranks hold the same cache and meet in the same collectives.

Faults: the process group has a timeout; a rank that dies makes the others' next collective fail (gloo sees
the closed connection at once, a hung rank after the timeout), and `WorkerGroup` reports which rank is gone.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen35.parallel.state import TensorParallel

log = logging.getLogger("qwen35")

#: how long a collective waits for a rank that does not answer
TIMEOUT_S = float(os.environ.get("QWEN35_TP_TIMEOUT_S", "60"))


class RankLost(RuntimeError):
    """A rank exited or a collective failed: the ranks are out of step and the engine cannot go on."""

    fatal = True  # the server stops on it (server/async_engine.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, size: int, address: str) -> None:
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() and os.environ.get("QWEN35_TP_BACKEND") != "gloo" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def receive() -> Any:
    """The next message rank 0 broadcast."""
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def worker_main(rank: int, size: int, address: str, expert_parallel: bool, load: dict, threads: int | None) -> None:
    """Rank `rank` (> 0): load its share, then run what rank 0 sends until it says stop."""
    import torch.distributed as dist

    from qwen35.engine.model_runner import ModelRunner
    from qwen35.weights import load_model

    if threads:
        torch.set_num_threads(threads)
    _init(rank, size, address)
    try:
        tp = TensorParallel(rank, size, expert_parallel=expert_parallel)
        model = load_model(tensor_parallel=tp, progress=False, **load)
        runner = None
        while True:
            msg = receive()
            kind = msg[0]
            if kind == "step":
                runner.execute(msg[1])
            elif kind == "copy_slot":
                runner.cache.copy_slot(msg[1], msg[2])
            elif kind == "setup":  # the cache plan rank 0 chose
                runner = ModelRunner(model, msg[1])
            elif kind == "stop":
                break
            else:
                raise RuntimeError(f"rank {rank}: unknown message {kind!r}")
    finally:
        dist.destroy_process_group()


@dataclass
class WorkerGroup:
    """Ranks 1..N-1 as child processes of rank 0 (this process)."""

    tp: TensorParallel
    processes: list = field(default_factory=list)
    closed: bool = False

    @classmethod
    def start(cls, size: int, expert_parallel: bool, load: dict, threads: int | None = None) -> WorkerGroup:
        """Spawn ranks 1..size-1 with the load arguments of `load_model` (`path_or_id`, `dtype`, `device`,
        `load_format`, `seed`), and join the process group as rank 0."""
        import torch.multiprocessing as mp

        address = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        procs = []
        for rank in range(1, size):
            p = ctx.Process(target=worker_main, args=(rank, size, address, expert_parallel, load, threads),
                            name=f"qwen35-tp-rank{rank}", daemon=True)
            p.start()
            procs.append(p)
        try:
            _init(0, size, address)
        except BaseException:
            for p in procs:
                p.kill()
            raise
        group = cls(TensorParallel(0, size, expert_parallel=expert_parallel), procs)
        log.info("tensor parallel: %d ranks (gloo, one host)%s", size, ", expert parallel" if expert_parallel else "")
        return group

    def check(self) -> None:
        """Raise RankLost if a rank has exited."""
        dead = [p for p in self.processes if not p.is_alive()]
        if dead:
            raise RankLost(f"tensor parallel: {', '.join(p.name for p in dead)} exited (code "
                           f"{[p.exitcode for p in dead]}); the engine cannot go on")

    def broadcast(self, msg: tuple) -> None:
        """Send `msg` to every other rank (they run it in order)."""
        import torch.distributed as dist

        self.check()
        try:
            dist.broadcast_object_list([msg], src=0)
        except RuntimeError as e:
            self.failed(e)

    def failed(self, e: BaseException) -> None:
        """A step failed under tensor parallelism: the ranks are out of step. Raise RankLost (naming the rank
        that exited, if one did)."""
        for p in self.processes:
            p.join(timeout=0.5)  # a rank that just died: let its exit show
        self.check()
        raise RankLost(f"tensor parallel: a step failed on rank 0 ({type(e).__name__}: {e}); the ranks are out "
                       "of step and the engine cannot go on") from e

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        import torch.distributed as dist

        try:
            if all(p.is_alive() for p in self.processes):
                dist.broadcast_object_list([("stop",)], src=0)
        except Exception:  # a rank already gone: nothing to tell it
            pass
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
