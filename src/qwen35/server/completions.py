"""`POST /v1/completions`: text or token-id prompts (one or several), `echo`, `logprobs`, `stream`.

Choice `i * n + j` is the j-th completion of the i-th prompt. `echo` puts the prompt text before the
completion (for token-id prompts, their decoded text). `logprobs` (0-20) gives each generated token's logprob
and the top ones; with `echo`, the prompt tokens' logprobs would be needed too, which the engine does not
compute, so `echo` with `logprobs` is refused (400).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from qwen35.server.async_engine import EngineError, EngineUnavailable
from qwen35.server.errors import APIError
from qwen35.server.protocol import MAX_PROMPTS, CompletionRequest
from qwen35.server.serving import (
    SSE_DONE,
    SSE_HEADERS,
    ClientGone,
    RequestTimer,
    Serving,
    clean_float,
    collect_final,
    engine_error_event,
    json_response,
    merge_streams,
    new_id,
    on_finish_cleanup,
    sse,
    usage,
)


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]


def plan_prompts(serving: Serving, req: CompletionRequest) -> list[_Prompt]:
    """The prompts as (text, ids) (blocking: the tokenizer; run it in a worker thread)."""
    p = req.prompt
    if isinstance(p, str):
        items: list[str | list[int]] = [p]
    elif not p:
        raise APIError("the prompt is empty", 400, param="prompt", code="invalid_value")
    elif all(isinstance(x, int) for x in p):
        items = [list(p)]  # type: ignore[arg-type]
    else:
        items = list(p)  # type: ignore[arg-type]
    if len(items) > MAX_PROMPTS:
        raise APIError(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", 400, param="prompt",
                       code="invalid_value")
    out = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids = serving.tokenizer.encode(item)
            text: str | None = item
        else:
            ids = list(item)
            serving.check_prompt_ids(ids, param)
            text = serving.tokenizer.decode(ids, skip_special_tokens=False) if req.echo else None
        serving.check_prompt_ids(ids, param)
        out.append(_Prompt(text, ids))
    return out


@dataclass
class _Choice:
    index: int
    echo: str
    offset: int = 0  # characters of text returned so far (for text_offset)


class CompletionHandler:
    def __init__(self, serving: Serving):
        self.s = serving

    async def create(self, req: CompletionRequest, request: Request) -> Response:
        s = self.s
        arrival = time.monotonic()
        model = s.check_model(req.model)
        if req.suffix:
            raise APIError("suffix is not supported", 400, param="suffix", code="unsupported_parameter")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError("best_of is only supported equal to n", 400, param="best_of",
                           code="unsupported_parameter")
        if req.echo and req.logprobs is not None:
            raise APIError("echo with logprobs is not supported (prompt logprobs are not computed)", 400,
                           param="echo", code="unsupported_parameter")
        if req.stream_options is not None and not req.stream:
            raise APIError("stream_options is only allowed with stream: true", 400, param="stream_options",
                           code="invalid_value")
        prompts = await asyncio.to_thread(plan_prompts, s, req)
        many = len(prompts) > 1
        plans = []
        for i, pr in enumerate(prompts):
            max_tokens = s.output_budget(len(pr.ids), req.max_tokens, f"prompt[{i}]" if many else "prompt")
            params = s.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                       output_kind="delta" if req.stream else "final_only")
            plans.append((pr, params))
        base = new_id("cmpl")
        ids = [f"{base}-{i}" for i in range(len(plans))]
        streams = []
        try:
            for rid, (pr, params) in zip(ids, plans, strict=True):
                s.metrics.prompt_tokens.inc(len(pr.ids))
                streams.append(s.submit(rid, {"prompt_token_ids": pr.ids, "prompt": pr.text}, params))
        except BaseException:
            s.abort(ids)
            raise
        timer = RequestTimer(s.metrics, "completions", arrival)
        n = req.n
        choices = {(i, j): _Choice(i * n + j, (pr.text or "") if req.echo else "")
                   for i, pr in enumerate(prompts) for j in range(n)}
        created = int(time.time())
        n_prompt = sum(len(pr.ids) for pr in prompts)
        if req.stream:
            cleanup = on_finish_cleanup(s, ids, lambda: all(st.finished for st in streams))
            return StreamingResponse(self._stream(req, base, model, created, streams, choices, n_prompt, timer,
                                                  cleanup),
                                     media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(cleanup))
        try:
            outs = await collect_final(streams, request)
        except ClientGone:
            s.abort(ids)
            timer.finish(["abort"])
            return Response(status_code=499)
        except ValueError as e:
            s.abort(ids)
            timer.finish(["error"])
            raise APIError(str(e), 400) from None
        except EngineError as e:
            s.abort(ids)
            timer.finish(["error"])
            status = 503 if isinstance(e, EngineUnavailable) else 500
            raise APIError(str(e), status, code="engine_unavailable" if status == 503 else "engine_error") from None
        except asyncio.CancelledError:
            s.abort(ids)
            raise
        result = []
        completion_tokens = 0
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ch = choices[(i, c.index)]
                completion_tokens += len(c.token_ids)
                result.append({"index": ch.index, "text": ch.echo + c.text,
                               "logprobs": self._logprobs(c, req.logprobs, ch) if req.logprobs is not None else None,
                               "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        result.sort(key=lambda x: x["index"])
        timer.whole(outs, completion_tokens)
        timer.finish([r["finish_reason"] or "stop" for r in result])
        return json_response({"id": base, "object": "text_completion", "created": created, "model": model,
                              "choices": result,
                              "usage": usage(n_prompt, completion_tokens,
                                             sum(o.num_cached_tokens or 0 for o in outs))})

    def _logprobs(self, c: Any, top_n: int, ch: _Choice) -> dict[str, Any]:
        s = self.s
        tokens, lps, tops, offsets = [], [], [], []
        offset = ch.offset  # echo and logprobs do not go together: no prompt text before
        for tok, d in zip(c.token_ids, c.logprobs or [], strict=False):
            own = d.get(tok)
            text = s.token_text(tok, own)
            tokens.append(text)
            lps.append(clean_float(own.logprob if own else None))
            ranked = sorted((x for x in d.items() if x[1].rank is not None and x[1].rank <= top_n),
                            key=lambda x: x[1].rank)
            top = {s.token_text(t, lp): clean_float(lp.logprob) for t, lp in ranked}
            top.setdefault(text, lps[-1])
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        ch.offset = offset
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _stream(self, req: CompletionRequest, base: str, model: str, created: int, streams: list[Any],
                      choices: dict[tuple[int, int], _Choice], n_prompt: int, timer: RequestTimer,
                      cleanup: Any) -> AsyncIterator[str]:
        completion_tokens = 0
        reasons: list[str] = []
        echoed: set[int] = set()

        def chunk(ch: _Choice, text: str, lp: Any, finish: str | None, stop_reason: Any = None) -> str:
            choice: dict[str, Any] = {"index": ch.index, "text": text, "logprobs": lp, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop_reason
            return sse({"id": base, "object": "text_completion", "created": created, "model": model,
                        "choices": [choice]})

        try:
            cached: dict[int, int] = {}
            async for i, out in merge_streams(streams):
                if out.num_cached_tokens is not None:
                    cached[i] = out.num_cached_tokens
                step_tokens = 0
                for c in out.outputs:
                    ch = choices[(i, c.index)]
                    step_tokens += len(c.token_ids)
                    text = c.text
                    if ch.index not in echoed:
                        echoed.add(ch.index)
                        text = ch.echo + text
                    lp = self._logprobs(c, req.logprobs, ch) if req.logprobs is not None else None
                    if text or lp is not None or c.finish_reason is not None:
                        yield chunk(ch, text, lp, c.finish_reason, c.stop_reason)
                    if c.finish_reason is not None:
                        reasons.append(c.finish_reason)
                completion_tokens += step_tokens
                timer.tokens(step_tokens)
            timer.finish(reasons)
            if req.stream_options is not None and req.stream_options.include_usage:
                yield sse({"id": base, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage(n_prompt, completion_tokens, sum(cached.values()))})
            yield SSE_DONE
        except (EngineError, ValueError) as e:
            timer.finish(["error"])
            yield engine_error_event(e)
            yield SSE_DONE
        finally:
            if not timer.done:
                timer.finish(["abort"])
            cleanup()


__all__ = ["CompletionHandler", "plan_prompts"]
