"""Helpers for the server tests: a tiny model with the real vocabulary, a scripted sampler (test double), a real
uvicorn server in a thread on a free loopback port, and a raw HTTP client.

(Named test_server_* to sit with the server's tests; it holds no tests itself.)
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import test_engine_support  # noqa: F401  (one torch thread)
from test_engine_support import make_model, write_config

import qwen35
from qwen35.server import ServerConfig, build_app, make_uvicorn_server

EOS = 248046
VOCAB = 248320


def tiny_model(folder: Path):
    """A tiny random model (hidden 32, 4 layers) with Qwen3.5's vocabulary, so the real tokenizer works."""
    return make_model(write_config(folder, vocab_size=VOCAB))


def make_llm(model, **kw) -> qwen35.LLM:
    kw.setdefault("kv_cache_memory_bytes", 1 << 25)
    kw.setdefault("max_model_len", 1024)
    return qwen35.LLM(model, **kw)


# ------------------------------------------------------------------------------------------ scripted output
Script = Callable[[str], "str | None"]


class ScriptedOutput:
    """Wraps the engine's model runner. For a sequence whose prompt one of the `scripts` answers (a function
    prompt text -> the output text, or None), the sampled token is replaced by the next token of that text,
    then EOS; every other sequence keeps the real sample. The engine, scheduler, cache and model stay real."""

    def __init__(self, runner: Any, tokenizer: Any, scripts: list[Script]):
        self.runner, self.tok, self.scripts = runner, tokenizer, scripts
        self.real_run = runner.run
        self._cache: dict[tuple[int, ...], list[int] | None] = {}
        self._lock = threading.Lock()

    def script_for(self, prompt_ids: Any) -> list[int] | None:
        key = tuple(prompt_ids)
        with self._lock:
            if key not in self._cache:
                text = self.tok.decode(list(key), skip_special_tokens=False)
                out = None
                for script in self.scripts:
                    out = script(text)
                    if out is not None:
                        break
                self._cache[key] = None if out is None else self.tok.encode(out) + [EOS]
            return self._cache[key]

    def run(self, work: Any, plan: Any) -> Any:
        sampled = self.real_run(work, plan)
        for i, seq in enumerate(plan.seqs):
            script = self.script_for(seq.token_ids[:seq.num_prompt_tokens])
            if script is not None:
                pos = len(seq.token_ids) - seq.num_prompt_tokens
                sampled.token_ids[i] = script[pos] if pos < len(script) else EOS
        return sampled


def install_scripts(llm: qwen35.LLM, scripts: list[Script]) -> ScriptedOutput:
    runner = llm.engine.runner
    scripted = ScriptedOutput(runner, llm.tokenizer, scripts)
    runner.run = scripted.run
    return scripted


def last_user_message(prompt: str) -> str:
    """The text of the last user turn of a ChatML prompt."""
    turns = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S)
    return turns[-1] if turns else ""


# ------------------------------------------------------------------------------------------ the server
class ServerThread:
    """A real uvicorn serving `build_app(llm, config)` in a thread, on a free port of 127.0.0.1."""

    def __init__(self, llm: Any, config: ServerConfig | None = None):
        self.app = build_app(llm, config)
        self.serving = self.app.state.serving
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = make_uvicorn_server(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ raw HTTP
class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI-shaped error (asserting the shape)."""
        data = self.json()
        assert set(data) == {"error"}, data
        err = data["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        return err


def call(port: int, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 120.0) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def sse_events(body: bytes) -> list[str]:
    """The `data:` payloads of an event stream, checking the framing (every event is one data line)."""
    text = body.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        events.append(block[len("data: "):])
    return events


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition."""
    key = name + (("{" + labels + "}") if labels else "")
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def get_metrics(port: int, headers: dict[str, str] | None = None) -> str:
    r = call(port, "GET", "/metrics", headers=headers)
    assert r.status == 200, r.body
    return r.body.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve_process(tmp_path: Path, *flags: str, config: dict | None = None):
    """`qwen35 serve` on a tiny dummy model (real vocabulary; `config`: changes to its config.json) as a real
    process with `flags`; returns (process, port, log file) once /health answers 200. `stop_serve_process` ends
    it."""
    import os
    import subprocess
    import sys

    folder = write_config(tmp_path / "tiny", **{"vocab_size": 248320, **(config or {})})
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("QWEN35_API_KEY", None)
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 (closed by stop_serve_process)
    proc = subprocess.Popen([sys.executable, "-m", "qwen35.cli", "serve", str(folder), "--load-format", "dummy",
                             "--port", str(port), "--served-model-name", "tiny", "--kv-cache-memory-bytes",
                             str(1 << 25), "--log-level", "warning", *flags],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if call(port, "GET", "/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
    except BaseException:
        stop_serve_process(proc, log)
        raise
    return proc, port, log


def stop_serve_process(proc, log) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    log.close()
