"""`POST /v1/completions`: text or token-id prompts (one or several), `echo`, `logprobs`, `stream`.

Choice `i * n + j` is the j-th completion of the i-th prompt. `echo` puts the prompt text before the
completion (for token-id prompts, their decoded text). `logprobs` (0-20) gives each token's logprob and the top
ones in the legacy shape (`tokens`, `token_logprobs`, `top_logprobs`: token text -> logprob, `text_offset`: where
each token starts in the returned text); with `echo` the prompt's tokens come first, computed by the engine in
the prompt's forward (`SamplingParams.prompt_logprobs`), the first one with None (nothing predicts it).
`max_tokens: 0` with `echo` returns the prompt alone (finish_reason "length"; the engine runs the prompt and its
one sampled token is dropped), as vLLM does: lm-evaluation-harness's loglikelihood requests send `echo: true,
logprobs: 1, max_tokens: 1` (or 0) and read the prompt's logprobs. Streaming puts the echoed prompt and its
logprobs in each choice's first chunk. `structured_outputs` (vLLM's: json, json_object, regex, choice, grammar) or
`response_format` (json_object, json_schema) constrain every choice (qwen35.engine.structured); a schema or grammar
that does not compile is a 400 naming it, before anything is queued.
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

from qwen35.engine.outputs import PromptLogprobs
from qwen35.engine.sampling import SamplingParams, StructuredOutputsParams
from qwen35.engine.structured import structured_from_request
from qwen35.server.async_engine import EngineError
from qwen35.server.errors import APIError
from qwen35.server.protocol import MAX_PROMPTS, CompletionRequest
from qwen35.server.serving import (
    SSE_DONE,
    SSE_HEADERS,
    ClientGone,
    RequestTimer,
    Serving,
    clean_float,
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
    prompt_part: dict[str, list] | None = None  # the echoed prompt's logprobs, until returned (first chunk)


def prompt_offsets(tokenizer: Any, ids: list[int]) -> list[int]:
    """Where each token of `ids` starts in their decoded text (a token that ends a character begun by earlier
    ones starts where that character is written)."""
    detok = tokenizer.detokenizer(skip_special_tokens=False)
    offsets, at = [], 0
    for tok in ids:
        offsets.append(at)
        at += len(detok.add(tok))
    return offsets


def structured_for(serving: Serving, req: CompletionRequest) -> StructuredOutputsParams | None:
    """The request's `structured_outputs` or `response_format`, compiled for the engine now (blocking: run it in a
    worker thread), so a bad schema or grammar is a 400 naming it and the engine's thread finds it compiled."""
    try:
        structured = structured_from_request(req.structured_outputs, req.response_format)
        if structured is not None:
            serving.engine.compile_grammar(SamplingParams(structured_outputs=structured))
    except ValueError as e:
        message = str(e)
        if req.structured_outputs is None:  # the schema came in response_format: name it there
            message = message.replace("structured_outputs.json", "response_format.json_schema.schema")
        param = "structured_outputs" if message.startswith("structured_outputs") or req.structured_outputs \
            is not None and not message.startswith("response_format") else "response_format"
        raise APIError(message, 400, param=param, code="invalid_value") from None
    return structured


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
        prompt_only = req.max_tokens == 0
        if prompt_only and not req.echo:
            raise APIError("max_tokens must be >= 1 (0 is only allowed with echo: the prompt alone)", 400,
                           param="max_tokens", code="invalid_value")
        if req.stream_options is not None and not req.stream:
            raise APIError("stream_options is only allowed with stream: true", 400, param="stream_options",
                           code="invalid_value")
        prompts = await asyncio.to_thread(plan_prompts, s, req)
        structured = await asyncio.to_thread(structured_for, s, req)
        many = len(prompts) > 1
        plans = []
        for i, pr in enumerate(prompts):
            max_tokens = s.output_budget(len(pr.ids), 1 if prompt_only else req.max_tokens,
                                         f"prompt[{i}]" if many else "prompt")
            params = s.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                       output_kind="delta" if req.stream else "final_only")
            if req.echo and req.logprobs is not None:
                params = params.clone(prompt_logprobs=req.logprobs)
            if structured is not None:
                params = params.clone(structured_outputs=structured)
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
            return StreamingResponse(self._stream(req, base, model, created, streams, prompts, choices, n_prompt,
                                                  timer, cleanup),
                                     media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(cleanup))
        try:
            outs = await s.final_outputs(ids, streams, request, timer)  # aborts them all on any failure
        except ClientGone:
            return Response(status_code=499)
        result = []
        completion_tokens = 0
        for i, out in enumerate(outs):
            self._echo_logprobs(req, prompts[i], out.prompt_logprobs, [choices[(i, j)] for j in range(n)])
            for c in sorted(out.outputs, key=lambda c: c.index):
                ch = choices[(i, c.index)]
                if prompt_only:
                    drop_generated(c)
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

    def _echo_logprobs(self, req: CompletionRequest, pr: _Prompt, entries: PromptLogprobs | None,
                       chs: list[_Choice]) -> None:
        """With echo and logprobs: the legacy lists of the prompt's tokens (from the engine's prompt logprobs),
        given to the choices of that prompt for their first logprobs; once per prompt (the engine reports them
        once). Without them (a request aborted before its prompt was computed) the tokens come with None."""
        if not req.echo or req.logprobs is None:
            return
        s, top_n = self.s, req.logprobs
        tokens, lps, tops = [], [], []
        for k, tok in enumerate(pr.ids):
            d = entries[k] if entries is not None and k < len(entries) else None
            own = d.get(tok) if d else None
            text = s.token_text(tok, own)
            tokens.append(text)
            if d is None:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(clean_float(own.logprob if own else None))
            tops.append(self._top(d, top_n, text, lps[-1]))
        part = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": prompt_offsets(s.tokenizer, pr.ids)}
        for ch in chs:
            ch.prompt_part = part

    def _top(self, d: dict, top_n: int, own_text: str, own_lp: float | None) -> dict[str, float | None]:
        """token text -> logprob of the `top_n` best (by rank) and the token itself."""
        s = self.s
        ranked = sorted((x for x in d.items() if x[1].rank is not None and x[1].rank <= top_n),
                        key=lambda x: x[1].rank)
        top = {s.token_text(t, lp): clean_float(lp.logprob) for t, lp in ranked}
        top.setdefault(own_text, own_lp)
        return top

    def _logprobs(self, c: Any, top_n: int, ch: _Choice) -> dict[str, Any]:
        s = self.s
        tokens, lps, tops, offsets = [], [], [], []
        offset = ch.offset
        if ch.prompt_part is not None:  # the echoed prompt's tokens first (their offsets start at 0)
            part, ch.prompt_part = ch.prompt_part, None
            tokens, lps, tops = list(part["tokens"]), list(part["token_logprobs"]), list(part["top_logprobs"])
            offsets = list(part["text_offset"])
            offset = len(ch.echo)
        for tok, d in zip(c.token_ids, c.logprobs or [], strict=False):
            own = d.get(tok)
            text = s.token_text(tok, own)
            tokens.append(text)
            lps.append(clean_float(own.logprob if own else None))
            tops.append(self._top(d, top_n, text, lps[-1]))
            offsets.append(offset)
            offset += len(text)
        ch.offset = offset
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _stream(self, req: CompletionRequest, base: str, model: str, created: int, streams: list[Any],
                      prompts: list[_Prompt], choices: dict[tuple[int, int], _Choice], n_prompt: int,
                      timer: RequestTimer, cleanup: Any) -> AsyncIterator[str]:
        completion_tokens = 0
        reasons: list[str] = []
        echoed: set[int] = set()
        prompt_seen: set[int] = set()

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
                if i not in prompt_seen:  # the engine's first report of a request holds its prompt logprobs
                    prompt_seen.add(i)
                    self._echo_logprobs(req, prompts[i], out.prompt_logprobs,
                                        [choices[(i, j)] for j in range(req.n)])
                for c in out.outputs:
                    ch = choices[(i, c.index)]
                    if req.max_tokens == 0:
                        drop_generated(c)
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


def drop_generated(c: Any) -> None:
    """`max_tokens: 0`: the prompt alone. The engine sampled one token (a request makes at least one); it is not
    returned, and the choice ends "length" as its zero-token budget says."""
    c.text, c.token_ids, c.logprobs = "", [], [] if c.logprobs is not None else None
    if c.finish_reason not in (None, "abort"):
        c.finish_reason, c.stop_reason = "length", None


__all__ = ["CompletionHandler", "drop_generated", "plan_prompts", "prompt_offsets"]
