"""The kernel build's lock handling (qwen35.ops.cpu_kernels): a lock left by a killed build must not block later
builds forever, and a fresh one (another process compiling) is waited for."""

import os
import threading
import time

from qwen35.ops import cpu_kernels


def test_stale_lock_is_removed(tmp_path, caplog):
    lock = tmp_path / "lock"
    lock.write_text("")
    old = time.time() - cpu_kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_kernels._clear_stale_lock(tmp_path)
    assert not lock.exists()
    assert "did not finish" in caplog.text


def test_fresh_lock_is_waited_for(tmp_path, caplog):
    lock = tmp_path / "lock"
    lock.write_text("")
    threading.Timer(0.5, lock.unlink).start()
    t0 = time.monotonic()
    cpu_kernels._clear_stale_lock(tmp_path)
    assert time.monotonic() - t0 >= 0.4
    assert "waiting for it" in caplog.text


def test_no_lock_returns_at_once(tmp_path):
    t0 = time.monotonic()
    cpu_kernels._clear_stale_lock(tmp_path)
    assert time.monotonic() - t0 < 0.5


def test_denormals_are_flushed_in_every_calling_threads_pool(monkeypatch):
    """OpenMP gives each thread that opens parallel regions its own workers (the server's engine thread is not the
    thread that loaded the model), so flush_denormals flushes once per calling thread, not once per process."""
    calls: list[int] = []

    class Fake:
        def flush_denormals_all_threads(self):
            calls.append(threading.get_ident())
            return 2

    monkeypatch.setattr(cpu_kernels, "build", lambda: Fake())
    monkeypatch.setattr(cpu_kernels, "_flushed_threads", {})
    cpu_kernels.flush_denormals()
    cpu_kernels.flush_denormals()  # the same thread again: nothing to do
    assert calls == [threading.get_ident()]
    t = threading.Thread(target=cpu_kernels.flush_denormals)
    t.start()
    t.join()
    assert len(calls) == 2 and calls[1] != calls[0]
