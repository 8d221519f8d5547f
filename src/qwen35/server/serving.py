"""What the chat and completion routes share: the engine, model names, request checks, sampling parameters,
logprobs, JSON and SSE encoding, and waiting for outputs while watching for a client that goes away."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from qwen35.engine.outputs import CompletionOutput, RequestOutput
from qwen35.engine.sampling import SamplingParams
from qwen35.server.async_engine import AsyncEngine, EngineError, EngineUnavailable, RequestStream
from qwen35.server.errors import APIError, error_body
from qwen35.server.media import MediaPolicy
from qwen35.server.metrics import ServerMetrics
from qwen35.server.protocol import MAX_STOP

LOGPROB_FLOOR = -9999.0  # JSON has no -inf


@dataclass
class ServerConfig:
    """How the server is set up (the flags of `qwen35 serve`)."""

    served_model_name: str = "qwen35"
    model_aliases: tuple[str, ...] = ()  # other names accepted in `model` (e.g. the checkpoint path)
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 32 << 20
    drain_timeout_s: float = 30.0
    chat_template: str | None = None  # overrides the tokenizer's template (None: the checkpoint's or built-in)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens or 0}}


def clean_float(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return LOGPROB_FLOOR
    return max(v, LOGPROB_FLOOR) if math.isfinite(v) or v < 0 else 0.0


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def sse(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_PARAM_RE = re.compile(r"SamplingParams\.(\w+)")


class Serving:
    """The engine and everything the routes need of it."""

    def __init__(self, llm: Any, config: ServerConfig):
        self.llm = llm
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        if self.tokenizer is None:
            raise ValueError("the server needs a tokenizer (the LLM was made with skip_tokenizer_init=True)")
        self.defaults: SamplingParams = llm.default_sampling_params
        self.config = config
        self.async_engine = AsyncEngine(self.engine)
        self.metrics = ServerMetrics(self.async_engine)
        self.max_model_len: int = self.engine.max_model_len
        self.vocab_size: int = self.engine.vocab_size
        self.created = int(time.time())
        self.chat_template = config.chat_template if config.chat_template is not None else \
            getattr(self.tokenizer, "chat_template", None)
        vision = getattr(getattr(getattr(self.engine, "model", None), "config", None), "vision", None)
        self.accepts_images = vision is not None and hasattr(self.engine, "prepare_prompt")
        self.no_vision_message = getattr(getattr(self.engine, "model", None), "no_vision_message",
                                         "it has no vision encoder")
        self.think_end_id = self.tokenizer.token_to_id("</think>")
        self.call_close_id = self.tokenizer.token_to_id("</tool_call>")

    # ------------------------------------------------------------------------------------------ models
    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.config.served_model_name, *self.config.model_aliases)

    def check_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if name is None or name in self.model_names:
            return self.config.served_model_name
        raise APIError(f"The model `{name}` does not exist. This server serves "
                       f"`{self.config.served_model_name}`.", 404, param="model", code="model_not_found")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.config.served_model_name, "object": "model", "created": self.created,
                "owned_by": "qwen35", "root": self.config.model_aliases[0] if self.config.model_aliases else None,
                "max_model_len": self.max_model_len}

    # ------------------------------------------------------------------------------------------ checks
    def check_prompt_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError("the prompt is empty: at least one token is needed", 400, param=param,
                           code="invalid_value")
        bad = next((t for t in ids if t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", 400, param=param,
                           code="invalid_value")

    def output_budget(self, num_prompt: int, max_tokens: int | None, param: str) -> int:
        """max_tokens for a prompt of `num_prompt` tokens (default: what the context leaves); 400 when the
        prompt, or the prompt with max_tokens, does not fit in the context."""
        limit = self.max_model_len
        if num_prompt >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens, but the prompt has {num_prompt} "
                           f"tokens (at least one must be left for the output). Please shorten the prompt.", 400,
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            return limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the "
                           f"completion). Please reduce the prompt or max_tokens.", 400, param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    def sampling_params(self, req: Any, *, max_tokens: int, logprobs: int | None, output_kind: str,
                        extra_stop_ids: tuple[int, ...] = (), thinking_budget: int | None = None) -> SamplingParams:
        """The checkpoint's defaults, overridden by what the request gives."""
        if req.logit_bias:
            raise APIError("logit_bias is not supported", 400, param="logit_bias", code="unsupported_parameter")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        stop = [s for s in stop if s]
        if len(stop) > MAX_STOP:
            raise APIError(f"at most {MAX_STOP} stop strings are allowed, got {len(stop)}", 400, param="stop",
                           code="invalid_value")
        changes: dict[str, Any] = {
            "n": req.n, "max_tokens": max_tokens, "stop": stop, "ignore_eos": req.ignore_eos,
            "min_tokens": req.min_tokens, "skip_special_tokens": req.skip_special_tokens,
            "include_stop_str_in_output": req.include_stop_str_in_output, "logprobs": logprobs,
            "stop_token_ids": [*(req.stop_token_ids or []), *extra_stop_ids], "output_kind": output_kind,
            "thinking_budget": thinking_budget,
        }
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(req, name)
            if v is not None:
                changes[name] = v
        if req.seed is not None:
            changes["seed"] = req.seed & (2**63 - 1)  # torch seeds are unsigned 64-bit; seed + i must fit
        try:
            return self.defaults.clone(**changes)
        except (ValueError, TypeError) as e:
            m = _PARAM_RE.search(str(e))
            raise APIError(str(e).replace("SamplingParams.", ""), 400, param=m.group(1) if m else None,
                           code="invalid_value") from None

    # ------------------------------------------------------------------------------------------ logprobs
    def token_text(self, tok: int, lp: Any = None) -> str:
        if lp is not None and getattr(lp, "decoded_token", None) is not None:
            return lp.decoded_token
        if tok >= getattr(self.tokenizer, "vocab_size", self.vocab_size):
            return ""
        return self.tokenizer.decode([tok], skip_special_tokens=False)

    def token_bytes(self, tok: int) -> list[int]:
        try:
            return list(self.tokenizer.id_to_bytes(tok))
        except Exception:
            return list(self.token_text(tok).encode("utf-8"))

    def chat_logprobs(self, c: CompletionOutput, top_n: int) -> list[dict[str, Any]]:
        out = []
        for tok, d in zip(c.token_ids, c.logprobs or [], strict=False):
            own = d.get(tok)
            tops = sorted((x for x in d.items() if x[1].rank is not None and x[1].rank <= top_n),
                          key=lambda x: x[1].rank)
            out.append({"token": self.token_text(tok, own), "logprob": clean_float(own.logprob if own else None),
                        "bytes": self.token_bytes(tok),
                        "top_logprobs": [{"token": self.token_text(t, lp), "logprob": clean_float(lp.logprob),
                                          "bytes": self.token_bytes(t)} for t, lp in tops[:top_n]]})
        return out

    # ------------------------------------------------------------------------------------------ running
    def submit(self, request_id: str, prompt: dict[str, Any], params: SamplingParams) -> RequestStream:
        try:
            return self.async_engine.add(request_id, prompt, params)
        except EngineError as e:
            raise APIError(str(e), 503, code="engine_unavailable") from None

    def abort(self, request_ids: list[str]) -> None:
        self.async_engine.abort(request_ids)

    async def final_outputs(self, request_ids: list[str], streams: list[RequestStream], request: Request,
                            timer: RequestTimer) -> list[RequestOutput]:
        """The final outputs of submitted requests: every route's one way to wait for them. Whatever goes wrong
        (the client leaves: ClientGone; an engine error: APIError; cancellation) aborts them all first."""
        try:
            return await collect_final(streams, request)
        except ClientGone:
            self.abort(request_ids)
            timer.finish(["abort"])
            raise
        except (ValueError, EngineError) as e:
            self.abort(request_ids)
            timer.finish(["error"])
            raise api_error_of(e) from None
        except BaseException:
            self.abort(request_ids)
            raise

    def with_structured(self, params: SamplingParams, structured: Any, param: str = "response_format",
                        ) -> SamplingParams:
        """`params` constrained to a structured-output spec; 400 naming `param` when the spec is malformed."""
        try:
            return params.clone(structured_outputs=structured)
        except (ValueError, TypeError) as e:
            raise APIError(f"invalid {param}: {e}", 400, param=param, code="invalid_value") from None


class RequestTimer:
    """Time to first token, inter-token latency and end-to-end latency of one request, into the metrics."""

    def __init__(self, metrics: ServerMetrics, endpoint: str, arrival: float):
        self.metrics, self.endpoint, self.arrival = metrics, endpoint, arrival
        self.last: float | None = None
        self.done = False

    def tokens(self, k: int) -> None:
        if k <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.arrival)
            if k > 1:
                self.metrics.itl.observe(0.0, k - 1)
        else:
            self.metrics.itl.observe((now - self.last) / k, k)
        self.last = now
        self.metrics.generation_tokens.inc(k)

    def whole(self, outs: list[RequestOutput], k: int) -> None:
        """A plain (not streamed) request: `k` tokens arrived at once; the engine's metrics say when the first
        one was made (both clocks are time.monotonic)."""
        if k <= 0:
            return
        now = time.monotonic()
        firsts = [o.metrics["arrival_time"] + o.metrics["time_to_first_token"] for o in outs
                  if "arrival_time" in o.metrics and "time_to_first_token" in o.metrics]
        first = min(firsts) if firsts else now
        self.metrics.ttft.observe(max(0.0, first - self.arrival))
        if k > 1:
            self.metrics.itl.observe(max(0.0, now - first) / (k - 1), k - 1)
        self.last = now
        self.metrics.generation_tokens.inc(k)

    def finish(self, reasons: list[str]) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
        for r in reasons:
            self.metrics.requests.inc(1, self.endpoint, r)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_final(streams: list[RequestStream], request: Request) -> list[RequestOutput]:
    """The final output of each stream, in order; ClientGone when the client disconnects first."""
    results: list[RequestOutput | None] = [None] * len(streams)

    async def drain(i: int, s: RequestStream) -> None:
        async for out in s:
            if out.finished:
                results[i] = out

    work = asyncio.ensure_future(asyncio.gather(*(drain(i, s) for i, s in enumerate(streams))))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            raise ClientGone()
        work.result()  # raises the stream's error, if any
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
    return [r for r in results if r is not None]


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come: (stream index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                q.put_nowait((i, out))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            q.put_nowait((i, e))
            return
        q.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def api_error_of(e: BaseException) -> APIError:
    """The HTTP error for a request that failed in the engine: 400 for a ValueError (bad input found late),
    503 when the engine is gone, else 500."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return APIError(str(e), 400)
    if isinstance(e, EngineUnavailable):
        return APIError(str(e), 503, code="engine_unavailable")
    return APIError(str(e), 500, code="engine_error")


def engine_error_event(e: BaseException) -> str:
    if isinstance(e, APIError):
        return sse(e.body())
    return sse(error_body(f"generation failed: {e}", "server_error", None, "engine_error"))


def on_finish_cleanup(serving: Serving, ids: list[str], finished: Callable[[], bool]) -> Callable[[], None]:
    """A callback that aborts the requests unless they finished (idempotent)."""
    state = {"done": False}

    def cleanup() -> None:
        if state["done"]:
            return
        state["done"] = True
        if not finished():
            serving.abort(ids)

    return cleanup


def local_path(p: str | None) -> Path | None:
    return Path(p).expanduser() if p else None


__all__ = ["ClientGone", "RequestTimer", "ServerConfig", "Serving", "collect_final", "dumps", "json_response",
           "merge_streams", "new_id", "sse", "usage"]
