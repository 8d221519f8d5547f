"""Prompts into token ids, and the checks a request passes before it reaches the scheduler.

A prompt is text, a list of token ids, or vLLM's dict (`prompt_token_ids` / `prompt`, and `multi_modal_data` with
images or videos, which the multimodal processor turns into placeholder tokens and pixels). Everything here
raises ValueError naming the field for a bad request and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from qwen35.chat.tags import THINK_CLOSE, THINK_OPEN
from qwen35.engine.sampling import SamplingParams

MAX_LOGPROBS = 20

PromptType = str | Sequence[int] | Mapping[str, Any]


class PreparedPrompt(NamedTuple):
    """A tokenised prompt, with its images / videos processed (`mm`, or None for text)."""

    text: str | None
    ids: list[int]
    mm: Any


class PromptPreparer:
    """Tokenises and checks the prompts of one engine. `model`: the engine's model (its vision config, for
    images); `model_folder`: the checkpoint folder (its processor configs), set by `LLM` when known."""

    def __init__(self, tokenizer: Any | None, vocab_size: int, model: torch.nn.Module):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.model = model
        self.model_folder = None
        self.mm_processor = None  # made on the first prompt with images or videos
        self._think_ids = self._token_id(THINK_OPEN), self._token_id(THINK_CLOSE)

    def prepare(self, prompt: PromptType) -> PreparedPrompt:
        """Tokenise a prompt; a dict with `multi_modal_data` ({"image": [...], "video": [...]}, vLLM's name)
        and a text `prompt` holding one placeholder per item also runs the image / video processors."""
        if isinstance(prompt, PreparedPrompt):
            return prompt
        if isinstance(prompt, Mapping) and prompt.get("multi_modal_data"):
            return self._prepare_multimodal(prompt)
        text, ids = self._prompt_ids(prompt)
        return PreparedPrompt(text, ids, None)

    def _prepare_multimodal(self, prompt: Mapping[str, Any]) -> PreparedPrompt:
        data = prompt["multi_modal_data"]
        text = prompt.get("prompt")
        if not isinstance(text, str):
            raise ValueError("a prompt with multi_modal_data needs its text in 'prompt' (with one "
                             "<|vision_start|><|image_pad|><|vision_end|> or ..<|video_pad|>.. per item)")
        if self.tokenizer is None:
            raise ValueError("a prompt with images or videos needs a tokenizer")
        unknown = set(data) - {"image", "video"}
        if unknown:
            raise ValueError(f"multi_modal_data keys must be 'image' and/or 'video', got {sorted(unknown)}")

        def as_list(x):
            return list(x) if isinstance(x, (list, tuple)) else [x]

        if self.mm_processor is None:
            from qwen35.multimodal.inputs import MultimodalProcessor

            if self.model.config.vision is None:
                raise ValueError(self.model.no_vision_message)
            self.mm_processor = MultimodalProcessor(self.model.config, self.model_folder)
        text, ids, mm = self.mm_processor.prepare(
            text, self.tokenizer, as_list(data.get("image", [])), as_list(data.get("video", [])),
            allow_remote=bool(prompt.get("allow_remote_media", False)))
        return PreparedPrompt(text, ids, mm)

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        text: str | None = None
        if isinstance(prompt, Mapping):
            if prompt.get("prompt_token_ids") is not None:
                ids, text = prompt["prompt_token_ids"], prompt.get("prompt")
            elif isinstance(prompt.get("prompt"), str):
                text = prompt["prompt"]
                ids = None
            else:
                raise ValueError("a prompt dict needs 'prompt_token_ids' (a list of ints) or 'prompt' (a string)")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt
        else:
            raise ValueError(f"a prompt is a string, a list of token ids or a dict, got {type(prompt).__name__}")
        if ids is None:
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this engine has none (give prompt_token_ids)")
            ids = self.tokenizer.encode(text)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of ints")
        return text, list(ids)

    def check(self, ids: list[int], params: SamplingParams, max_model_len: int) -> None:
        """ValueError for a request the engine cannot run: the prompt's ids, its length, the fields that need a
        tokenizer, logprob counts past what is reported."""
        if not ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}) (the model's vocabulary); "
                             f"got {bad[:5]}")
        if len(ids) >= max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but max_model_len is {max_model_len}: "
                             f"prompt + output must fit, so at most {max_model_len - 1} prompt tokens")
        if params.thinking_budget is not None and self.tokenizer is None:
            raise ValueError("SamplingParams.thinking_budget needs a tokenizer (to find <think> and </think>)")
        if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
            raise ValueError(f"SamplingParams.logprobs must be <= {MAX_LOGPROBS}, got {params.logprobs}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > MAX_LOGPROBS:
            raise ValueError(f"SamplingParams.prompt_logprobs must be <= {MAX_LOGPROBS}, got {params.prompt_logprobs}")

    def compile_grammar(self, params: SamplingParams, eos_token_ids: Sequence[int]):
        """The compiler of this tokenizer with `params`' grammar compiled in it (None without one); ValueError
        naming the field when it does not compile."""
        if params.structured_outputs is None:
            return None
        if self.tokenizer is None:
            raise ValueError("SamplingParams.structured_outputs needs a tokenizer (the grammar is over its tokens)")
        from qwen35.engine.structured import GrammarCompiler

        compiler = GrammarCompiler.for_tokenizer(self.tokenizer, self.vocab_size, tuple(eos_token_ids))
        compiler.compile(params.structured_outputs)
        return compiler

    def opens_thinking(self, ids: list[int]) -> bool:
        """Whether the prompt ends inside a think block (a chat prompt rendered with thinking on)."""
        start, end = self._think_ids
        if start is None:
            return False
        last_start = max((i for i, t in enumerate(ids) if t == start), default=-1)
        last_end = max((i for i, t in enumerate(ids) if t == end), default=-1)
        return last_start > last_end

    def _token_id(self, text: str) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.token_to_id(text)


__all__ = ["MAX_LOGPROBS", "PreparedPrompt", "PromptPreparer", "PromptType"]
