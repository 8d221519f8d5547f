"""`AsyncEngine`: one background thread steps the `LLMEngine`; the event loop never waits on it.

    engine = AsyncEngine(llm.engine)
    engine.start()                                   # inside the running event loop (the app's lifespan)
    stream = engine.add(request_id, prompt_ids, params)   # params with output_kind DELTA or FINAL_ONLY
    async for out in stream: ...                     # RequestOutputs; the last one has finished=True
    engine.abort(request_id)                         # client gone: its slot and blocks are freed at once
    await engine.shutdown()                          # drains the requests still running, then stops

Requests and aborts reach the thread through a thread-safe queue (`add` and `abort` never block); outputs go
back into each request's own `asyncio.Queue` through `loop.call_soon_threadsafe`. The thread steps while
there is work and sleeps on an event otherwise. If a step raises (a bug: requests are validated before they
get here), the requests of that moment fail with an error and the loop goes on with the next ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from qwen35.engine.outputs import RequestOutput

log = logging.getLogger("qwen35.server")


class EngineError(RuntimeError):
    """The engine failed while running this request (reported to its client as a 500)."""


class EngineUnavailable(EngineError):
    """The engine has stopped for good (e.g. a tensor-parallel rank died): reported as a 503."""


class RequestStream:
    """The outputs of one request, as an async iterator. Filled from the engine thread."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def _put(self, item: RequestOutput | BaseException) -> None:  # any thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    async def get(self) -> RequestOutput:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()


class AsyncEngine:
    def __init__(self, engine: Any, *, idle_poll_s: float = 1.0):
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stop = False
        self._idle_poll_s = idle_poll_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._submitted = 0  # written by the event loop only
        self._accepted = 0  # written by the engine thread only
        self.num_active = 0  # added, not yet finished (as the thread last saw it)
        self.step_count = 0
        self.last_error: str | None = None
        self.started = False
        self.on_fatal = None  # called (from the engine thread) when the engine stops for good: the server exits

    # ------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        """Start the thread; call from inside the running event loop that will consume the outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="qwen35-engine", daemon=True)
        self._thread.start()
        self.started = True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_pending(self) -> int:
        """Submitted, not yet taken by the engine thread."""
        return self._submitted - self._accepted

    @property
    def num_requests(self) -> int:
        """Requests submitted and not finished (pending + in the engine)."""
        return self.num_pending + self.num_active

    async def shutdown(self, drain_timeout_s: float | None = 30.0) -> None:
        """Let the running requests finish (at most `drain_timeout_s`), abort the rest, stop the thread."""
        if self._thread is None:
            return
        deadline = None if drain_timeout_s is None else time.monotonic() + drain_timeout_s
        while self.num_requests and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        if self.num_requests:
            log.warning("shutdown: aborting %d request(s) still running", self.num_requests)
        self._stop = True
        self._wake.set()
        thread = self._thread
        await asyncio.to_thread(thread.join, 30.0)
        self._thread = None

    # ------------------------------------------------------------------------------------------ requests
    def add(self, request_id: str, prompt: Any, params: Any) -> RequestStream:
        """Queue a request (already validated). Never blocks; an engine refusal arrives as a ValueError from
        the stream."""
        if self._loop is None or not self.alive:
            raise EngineUnavailable(f"the engine is not running ({self.last_error or 'stopped'})")
        stream = RequestStream(request_id, self._loop)
        self._submitted += 1
        self._inbox.put(("add", request_id, prompt, params, stream))
        self._wake.set()
        return stream

    def abort(self, request_id: str | list[str]) -> None:
        """Abort requests (unknown or finished ids are ignored). Never blocks."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        if ids:
            self._inbox.put(("abort", ids))
            self._wake.set()

    # ------------------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            import torch

            # As the model loader does for its thread: subnormal GDN state values make x86 arithmetic ~100x
            # slower; flushing them (a per-thread CPU flag) changes only values below 1e-38.
            torch.set_flush_denormal(True)
            with torch.inference_mode():
                self._loop_body()
        except BaseException as e:  # never silently: the server reports itself unhealthy
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("engine thread died")
            for s in list(self._streams.values()):
                s._put(EngineUnavailable(f"the engine stopped: {self.last_error}"))
            self._streams.clear()
            if self.on_fatal is not None:
                self.on_fatal()
            raise

    def _loop_body(self) -> None:
        eng = self.engine
        while True:
            self._drain_inbox()
            if self._stop:
                ids = list(self._streams)
                if ids:
                    eng.abort_request(ids)
                    try:
                        self._dispatch(eng.step())
                    except Exception:
                        log.exception("engine step failed while stopping")
                for s in self._streams.values():
                    s._put(EngineError("the server is shutting down"))
                self._streams.clear()
                self.num_active = 0
                return
            if eng.has_unfinished_requests():
                try:
                    outs = eng.step()
                except Exception as e:
                    if getattr(e, "fatal", False):  # the engine cannot go on (parallel/workers.py RankLost)
                        raise
                    self._fail_all(e)
                    continue
                self.step_count += 1
                self._dispatch(outs)
            else:
                self._wake.wait(self._idle_poll_s)
                self._wake.clear()

    def _drain_inbox(self) -> None:
        eng = self.engine
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, rid, prompt, params, stream = item
                try:
                    eng.add_request(rid, prompt, params)
                except Exception as e:  # ValueError: refused (checked earlier, so rare); anything else: a bug
                    stream._put(e if isinstance(e, ValueError) else EngineError(f"{type(e).__name__}: {e}"))
                else:
                    self._streams[rid] = stream
                    self.num_active = len(self._streams)
                self._accepted += 1
            else:
                ids = [rid for rid in item[1] if rid in self._streams]
                if ids:
                    eng.abort_request(ids)  # frees slots and blocks now
                    for rid in ids:
                        self._streams.pop(rid, None)
                    self.num_active = len(self._streams)

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted by its client: nobody listens
                continue
            stream._put(out)
            if out.finished:
                del self._streams[out.request_id]
        self.num_active = len(self._streams)

    def _fail_all(self, e: Exception) -> None:
        log.exception("engine step failed; failing the %d request(s) in flight", len(self._streams))
        self.last_error = f"{type(e).__name__}: {e}"
        ids = list(self._streams)
        err = EngineError(f"the engine failed: {type(e).__name__}: {e}")
        for rid in ids:
            self._streams.pop(rid)._put(err)
        self.num_active = 0
        try:
            self.engine.abort_request(ids)
            self.engine.step()  # flush the abort reports (nothing is scheduled for aborted requests)
        except Exception:
            log.exception("could not abort after a failed step")


__all__ = ["AsyncEngine", "EngineError", "EngineUnavailable", "RequestStream"]
