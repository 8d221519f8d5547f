"""Output objects, shaped as vLLM's `RequestOutput` / `CompletionOutput`.

For chat requests a completion also carries what the chat parsers found in its text: `reasoning_content`
(the text inside `<think>...</think>`), `content` (the answer) and `tool_calls`. With
`RequestOutputKind.DELTA` (streaming) `text`, `token_ids`, `logprobs` and, for chat, `reasoning_content` and
`content` hold only what is new since the previous report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    """Log-probability of one token, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: for each generated position: token id -> Logprob (the top-N and the sampled token)
SampleLogprobs = list[dict[int, Logprob]]
#: for each prompt position: None for the first (nothing predicts it), then token id -> Logprob (the top-N and the
#: prompt's own token, whatever its rank)
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it; None for EOS
    # chat only (filled by LLM.chat / chat_stream from the chat parsers)
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[Any] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)
    #: prompt tokens served from the prefix cache (None until the request was first scheduled)
    num_cached_tokens: int | None = None
    #: with SamplingParams.prompt_logprobs: one entry per prompt token (see PromptLogprobs); with DELTA outputs only
    #: in the first report after the prompt was computed; None otherwise (also for a request aborted before its
    #: prompt was wholly computed)
    prompt_logprobs: PromptLogprobs | None = None


__all__ = ["CompletionOutput", "Logprob", "PromptLogprobs", "RequestOutput", "SampleLogprobs"]
