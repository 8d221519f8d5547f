"""A request and its sequences.

A `Request` is what a caller adds: one prompt and one `SamplingParams`. It owns `n` `Sequence`s (one per
completion asked for); each sequence is scheduled, cached and sampled on its own. A sequence's cache
footprint is its GDN state slot plus the KV blocks covering its tokens (`slot`, `block_table`), managed by
`CacheManager`; `num_computed_tokens` counts the tokens already in the cache. Preemption frees both and sets
`num_computed_tokens` back to 0, so the sequence is recomputed from its prompt and generated tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from qwen35.engine.outputs import Logprob

if TYPE_CHECKING:
    from qwen35.engine.detokenize import OutputText
    from qwen35.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    generator: torch.Generator | None  # None for greedy sequences and keyed noise (top_k: engine/noise.py)
    text: OutputText
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    slot: int | None = None
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    # prefix cache (engine/cache_manager.py): the chain keys of its full blocks, how many of its blocks are
    # registered, the prompt tokens its first admission found cached, its latest snapshot while decoding
    block_keys: list = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int | None = None
    decode_snapshot: Any = None
    # speculative decoding: the drafts proposed for the tokens after the last one, and noise rows of the
    # sampler drawn for positions a verify step did not keep (used first by the next steps: engine/speculative.py)
    draft_ids: list[int] = field(default_factory=list)
    draft_slots: list[int] = field(default_factory=list)  # regions for the states after the drafts, during a step
    grid_state: Any = None  # (grid point, region): a verify step's state on the snapshot grid, for cache_computed
    pending_noise: list = field(default_factory=list)
    # sampling state
    noise_seed: int | None = None  # the seed of its randomness (None: greedy)
    thinking_budget: Any = None  # a qwen35.chat.ThinkingBudget when the request caps its reasoning
    grammar: Any = None  # a qwen35.engine.structured.GrammarState under structured output (kept across preemption)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    # outcome
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # what has been reported (for DELTA outputs)
    reported_tokens: int = 0
    reported_chars: int = 0
    final_reported: bool = False

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finished_time: float | None = None
    final_reported: bool = False
    # images / videos: a qwen35.multimodal.MultimodalPrompt, and its vision features once encoded (kept
    # across preemption, shared by the request's n sequences)
    mm: Any = None
    mm_features: torch.Tensor | None = None
    # SamplingParams.prompt_logprobs: the entries of the prompt positions computed so far ([None] for the first),
    # filled by whichever of its sequences computes a position first; reported once (DELTA) or every time
    prompt_logprobs: list | None = None
    prompt_logprobs_reported: bool = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)


def bare_sequence(token_ids: list[int], seq_id: int = 0) -> Sequence:
    """A greedy sequence outside any engine's request bookkeeping (driven by hand: `engine.direct`)."""
    from qwen35.engine.detokenize import OutputText
    from qwen35.engine.sampling import SamplingParams

    ids = list(token_ids)
    request = Request(request_id=f"direct-{seq_id}", prompt=None, prompt_token_ids=ids,
                      params=SamplingParams(temperature=0.0))
    seq = Sequence(seq_id=seq_id, request=request, index=0, token_ids=list(ids), num_prompt_tokens=len(ids),
                   generator=None, text=OutputText(None, []))
    request.sequences.append(seq)
    return seq
