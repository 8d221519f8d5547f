"""The ranks of a tensor-parallel engine: rank 0 is the process that drives the engine (scheduler, sampler,
outputs, the HTTP server); every other rank loads its share of the model and then runs what rank 0 broadcasts:
every step's forward (`ModelRunner.execute` on a `StepInput`) and every cache copy, in the same order, so that
all ranks hold the same cache and meet in the same collectives.

Two ways to get the ranks:
  * one host, by itself: `WorkerGroup.start` starts ranks 1..N-1 as child processes (`python -m
    qwen35.parallel.workers ...`: fresh interpreters that never import the caller's script, so a script that
    makes an LLM at top level, without an `if __name__ == "__main__":` guard, works);
  * under torchrun (one or several hosts: RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment):
    `WorkerGroup.join_torchrun` on every process; rank 0 returns and drives, the others follow until rank 0
    stops, then exit the process (so `qwen35 serve` serves HTTP on rank 0 only).

Faults: the process group has a timeout; a rank that dies makes the others' next collective fail (gloo sees
the closed connection at once, a hung rank after the timeout), and `WorkerGroup` reports which rank is gone.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen35.parallel.state import TensorParallel

log = logging.getLogger("qwen35")

def timeout_s() -> float:
    """How long a collective waits for a rank that does not answer (QWEN35_TP_TIMEOUT_S, default 60 s)."""
    return float(os.environ.get("QWEN35_TP_TIMEOUT_S", "60"))


class RankLost(RuntimeError):
    """A rank exited or a collective failed: the ranks are out of step and the engine cannot go on."""

    fatal = True  # the server stops on it (server/async_engine.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, size: int, address: str, device: str | torch.device = "cpu") -> None:
    import torch.distributed as dist

    backend = os.environ.get("QWEN35_TP_BACKEND") or ("nccl" if str(device).startswith("cuda") else "gloo")
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s()))


def receive() -> Any:
    """The next message rank 0 broadcast."""
    import torch.distributed as dist

    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun (or another launcher that sets
    torch.distributed's environment), else None."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))


def rank_device(device: str | torch.device, local_rank: int) -> str | torch.device:
    """A bare "cuda" becomes this rank's GPU (one GPU per rank on each host)."""
    return f"cuda:{local_rank}" if str(device) == "cuda" else device


def _follow(rank: int, size: int, expert_parallel: bool, load: dict, shm: dict | None = None) -> None:
    """Rank `rank` (> 0), its process group joined: load its share, then run what rank 0 sends until it says
    stop. `shm`: the shared-memory file of one host's ranks (parallel/shm.py), or None (gloo only)."""
    from qwen35.engine.model_runner import ModelRunner
    from qwen35.weights import load_model

    tp = TensorParallel(rank, size, expert_parallel=expert_parallel, shm=_shm_comm(shm, rank, size))
    if shm is not None:
        import torch.distributed as dist

        dist.barrier()  # every rank has mapped the file: rank 0 removes its name
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
            return
        else:
            raise RuntimeError(f"rank {rank}: unknown message {kind!r}")


def _shm_comm(shm: dict | None, rank: int, size: int, peers_alive=None):
    if shm is None:
        return None
    from qwen35.parallel.shm import SharedMemoryComm

    if peers_alive is None:  # a follower: rank 0 is its parent, gone when the parent id changes
        parent = os.getppid()
        peers_alive = lambda: os.getppid() == parent  # noqa: E731
    return SharedMemoryComm(shm["path"], rank, size, shm["slot_bytes"], timeout_s(), peers_alive)


def worker_main(rank: int, size: int, address: str, expert_parallel: bool, load: dict, threads: int | None,
                shm: dict | None = None) -> None:
    """A child process of rank 0 (one host): join the group, then follow (`python -m qwen35.parallel.workers`)."""
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    _init(rank, size, address, load.get("device", "cpu"))
    try:
        _follow(rank, size, expert_parallel, dict(load, device=rank_device(load.get("device", "cpu"), rank)), shm)
    finally:
        dist.destroy_process_group()


class Rank:
    """A child process running one rank (the interface of multiprocessing.Process that WorkerGroup uses)."""

    def __init__(self, rank: int, popen: subprocess.Popen):
        self.name, self.popen = f"qwen35-tp-rank{rank}", popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()
            self.popen.wait(10)


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
        from qwen35.parallel import shm as shm_mod

        port = _free_port()
        address = f"tcp://127.0.0.1:{port}"
        plain = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype | torch.device) else v)
                 for k, v in load.items()}
        shm = None
        if shm_mod.supported() and not str(load.get("device", "cpu")).startswith("cuda"):
            shm = {"path": f"/dev/shm/qwen35-tp-{os.getpid()}-{port}", "slot_bytes": shm_mod.slot_bytes_default()}
            shm_mod.create_file(shm["path"], size, shm["slot_bytes"])
        procs = []
        for rank in range(1, size):
            cmd = [sys.executable, "-m", "qwen35.parallel.workers", json.dumps(
                {"rank": rank, "size": size, "address": address, "expert_parallel": expert_parallel, "load": plain,
                 "threads": threads, "shm": shm})]
            procs.append(Rank(rank, subprocess.Popen(cmd)))
        try:
            _init(0, size, address, load.get("device", "cpu"))
        except BaseException:
            for p in procs:
                p.kill()
            if shm is not None:
                os.unlink(shm["path"])
            raise
        comm = _shm_comm(shm, 0, size, peers_alive=lambda: all(p.is_alive() for p in procs))
        if shm is not None:  # once every rank mapped it, the file needs no name: nothing is left behind
            import torch.distributed as dist

            dist.barrier()
            os.unlink(shm["path"])
        group = cls(TensorParallel(0, size, expert_parallel=expert_parallel, shm=comm), procs)
        atexit.register(group.close)  # stop the ranks and leave the group while the interpreter still runs
        log.info("tensor parallel: %d ranks (one host)%s", size, ", expert parallel" if expert_parallel else "")
        return group

    @classmethod
    def join_torchrun(cls, size: int, expert_parallel: bool, load: dict) -> WorkerGroup:
        """Under torchrun: join the group from the environment. Rank 0 returns the group; every other rank
        follows rank 0 and then exits the process."""
        import torch.distributed as dist

        rank, world, local_rank = torchrun_env()
        if world != size:
            raise ValueError(f"tensor_parallel_size={size} but torchrun started {world} processes (WORLD_SIZE): "
                             "they must be equal")
        _init(rank, size, "env://", load.get("device", "cpu"))
        if rank != 0:
            try:
                _follow(rank, size, expert_parallel, dict(load, device=rank_device(load.get("device", "cpu"),
                                                                                   local_rank)))
            finally:
                dist.destroy_process_group()
            raise SystemExit(0)
        log.info("tensor parallel: %d ranks under torchrun%s", size, ", expert parallel" if expert_parallel else "")
        group = cls(TensorParallel(0, size, expert_parallel=expert_parallel), [])
        atexit.register(group.close)
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


if __name__ == "__main__":  # a rank started by WorkerGroup.start
    spec = json.loads(sys.argv[1])
    worker_main(spec["rank"], spec["size"], spec["address"], spec["expert_parallel"], spec["load"], spec["threads"],
                spec.get("shm"))
