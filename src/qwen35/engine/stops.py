"""One generated token into its sequence, and the stop rules it may meet.

`append_token` adds the token (to the ids, the grammar, the logprobs and the detokenised text) and says how the
sequence ends, if it does: EOS (unless `ignore_eos`), a stop token id, a stop string (the text is cut at it),
`max_tokens`, or `max_model_len`. EOS and stop tokens count only after `min_tokens` tokens. The engine frees what
a finished sequence holds; nothing here touches the scheduler or the cache.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any, NamedTuple

from qwen35.engine.outputs import Logprob
from qwen35.engine.sequence import Sequence


class Finish(NamedTuple):
    reason: str  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or string; None for EOS and length


def append_token(seq: Sequence, tok: int, logprob: float | None, top: dict[int, Logprob] | None, *,
                 eos_token_ids: Seq[int], max_model_len: int, tokenizer: Any | None,
                 forced: bool = False) -> Finish | None:
    """Add one generated token to `seq`; its finish, if this token ends it. `forced`: the engine put the token
    there (the thinking budget), so it reports probability 1."""
    p = seq.params
    seq.token_ids.append(tok)
    if seq.grammar is not None:  # sampled or forced: the grammar follows every committed token
        seq.grammar.advance(tok)
    if p.logprobs is not None:
        if forced:
            top, logprob = {tok: Logprob(0.0, None)}, 0.0
        if tokenizer is not None and top:
            for t, lp in top.items():
                lp.decoded_token = tokenizer.decode([t], skip_special_tokens=False) if t < tokenizer.vocab_size else ""
        seq.logprobs.append(top or {})
        seq.cumulative_logprob += logprob if logprob is not None else 0.0
    n_out = seq.num_output_tokens
    can_stop = n_out > p.min_tokens  # min_tokens tokens come before any EOS / stop token
    if tok in eos_token_ids and not p.ignore_eos and can_stop:
        return Finish("stop")
    if tok in p.stop_token_ids and can_stop:
        if p.include_stop_str_in_output:
            seq.text.append(tok, check_stop=False)
        return Finish("stop", tok)
    matched = seq.text.append(tok, check_stop=n_out >= p.min_tokens)
    if matched is not None:
        return Finish("stop", matched)
    if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= max_model_len:
        return Finish("length")
    return None


__all__ = ["Finish", "append_token"]
