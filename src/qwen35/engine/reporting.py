"""What a request reports after a step, per its `SamplingParams.output_kind`: everything so far (CUMULATIVE),
what is new since its last report (DELTA, for streaming), or one output when it finishes (FINAL_ONLY).
The request's sequences remember how far they were reported; nothing else changes here."""

from __future__ import annotations

from qwen35.engine.outputs import CompletionOutput, RequestOutput
from qwen35.engine.sampling import RequestOutputKind
from qwen35.engine.sequence import Request, Sequence


def request_output(req: Request) -> RequestOutput | None:
    """The request's output for this step, or None when it has nothing to report."""
    kind = req.params.output_kind
    finished = req.finished
    if req.final_reported or (kind == RequestOutputKind.FINAL_ONLY and not finished):
        return None
    outs = []
    for seq in req.sequences:
        visible = seq.text.visible
        out_ids = seq.output_token_ids
        if kind == RequestOutputKind.DELTA:
            new_ids = out_ids[seq.reported_tokens:]
            new_text = visible[seq.reported_chars:]
            just_finished = seq.is_finished and not seq.final_reported
            if not new_ids and not new_text and not just_finished:
                continue
            outs.append(_completion(seq, new_text, new_ids, seq.reported_tokens))
        else:
            outs.append(_completion(seq, visible, list(out_ids), 0))
        seq.reported_tokens, seq.reported_chars = len(out_ids), len(visible)
        seq.final_reported = seq.is_finished
    if finished:
        req.final_reported = True
    if not outs and not finished:
        return None
    prompt_logprobs = None
    entries = req.prompt_logprobs
    if entries is not None and len(entries) == len(req.prompt_token_ids) and \
            not (kind == RequestOutputKind.DELTA and req.prompt_logprobs_reported):
        prompt_logprobs = list(entries)
        req.prompt_logprobs_reported = True
    return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                         outputs=outs, finished=finished, metrics=_metrics(req),
                         num_cached_tokens=req.sequences[0].num_cached_tokens, prompt_logprobs=prompt_logprobs)


def _completion(seq: Sequence, text: str, ids: list[int], lp_from: int) -> CompletionOutput:
    p = seq.params
    return CompletionOutput(
        index=seq.index, text=text, token_ids=list(ids),
        cumulative_logprob=seq.cumulative_logprob if p.logprobs is not None else None,
        logprobs=seq.logprobs[lp_from:] if p.logprobs is not None else None,
        finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)


def _metrics(req: Request) -> dict[str, float]:
    m = {"arrival_time": req.arrival_time}
    if req.first_token_time is not None:
        m["time_to_first_token"] = req.first_token_time - req.arrival_time
    return m


__all__ = ["request_output"]
