"""The OpenAI-compatible HTTP server (FastAPI + uvicorn, server-sent events for streams).

    from qwen35 import LLM
    from qwen35.server import ServerConfig, build_app, serve
    serve(LLM("Qwen/Qwen3.5-0.8B"), ServerConfig(served_model_name="qwen3.5"), host="127.0.0.1", port=8000)

Modules: `protocol` (request/response models), `async_engine` (the engine thread), `serving` (shared request
handling), `chat` and `completions` (the two generation routes), `anthropic` (Anthropic's Messages API, models
in `anthropic_protocol`), `errors` (OpenAI-shaped errors), `metrics` (Prometheus), `media` (which image sources a
request may name), `app` (routes and middlewares).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from qwen35.server.app import build_app
from qwen35.server.media import MediaPolicy
from qwen35.server.serving import ServerConfig

log = logging.getLogger("qwen35.server")


def make_uvicorn_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                        graceful_timeout_s: float | None = None, **uvicorn_kwargs: Any) -> Any:
    """A `uvicorn.Server` for `app`. On SIGINT/SIGTERM uvicorn stops accepting connections and waits for the
    open ones (at most `graceful_timeout_s`, None: as long as they run); then the engine stops."""
    import uvicorn

    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                         timeout_graceful_shutdown=graceful_timeout_s, **uvicorn_kwargs)
    return uvicorn.Server(cfg)


def serve(llm: Any, config: ServerConfig | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", sock: socket.socket | None = None, **uvicorn_kwargs: Any) -> None:
    """Serve `llm` until interrupted (blocking). On SIGINT/SIGTERM the requests in flight get
    `config.drain_timeout_s` seconds to finish; what still runs then is aborted."""
    config = config or ServerConfig()
    uvicorn_kwargs.setdefault("graceful_timeout_s", config.drain_timeout_s)
    app = build_app(llm, config)
    server = make_uvicorn_server(app, host=host, port=port, log_level=log_level, **uvicorn_kwargs)
    engine = app.state.serving.async_engine

    def stop() -> None:  # the engine stopped for good (a tensor-parallel rank died): answer 503, then exit
        server.should_exit = True

    engine.on_fatal = stop
    server.run(sockets=[sock] if sock is not None else None)
    if engine.last_error is not None and not engine.alive and engine.started:
        raise SystemExit(f"qwen35 serve: the engine stopped: {engine.last_error}")


__all__ = ["MediaPolicy", "ServerConfig", "build_app", "make_uvicorn_server", "serve"]
