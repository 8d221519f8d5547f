"""`LLM`: the offline API (vLLM's names).

    llm = qwen35.LLM("Qwen/Qwen3.5-0.8B")                       # or a folder, or load_format="dummy"
    outs = llm.generate(["Hello", {"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].outputs[0].finish_reason
    outs = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=256),
                    chat_template_kwargs={"enable_thinking": False})
    outs[0].outputs[0].content, outs[0].outputs[0].reasoning_content, outs[0].outputs[0].tool_calls

Streaming: `generate_stream(...)` / `chat_stream(...)` return iterators of `RequestOutput`s in DELTA form:
each holds, per completion that moved, only the new `token_ids` and `text` (for chat also the new
`reasoning_content` / `content` and any tool call that just completed); the last one of a request has
`finished=True` and the `finish_reason`. Leaving the loop early aborts the requests still running.

`llm.engine` is the `LLMEngine` underneath (add_request / step / abort_request / has_unfinished_requests)
for callers that drive requests themselves, such as a server.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qwen35.engine.llm_engine import LLMEngine, PromptType
from qwen35.engine.outputs import RequestOutput
from qwen35.engine.sampling import (
    RequestOutputKind,
    SamplingParams,
    eos_ids_from_generation_config,
    load_generation_config,
)

log = logging.getLogger("qwen35")

#: generate()/chat() show a progress bar (use_tqdm=True) from this many prompts on
PROGRESS_MIN_PROMPTS = 16

Conversation = Sequence[Mapping[str, Any]]


class LLM:
    def __init__(self, model: str | Path | torch.nn.Module, *, dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "auto", load_format: str = "auto", tokenizer: Any = None,
                 max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 kv_cache_memory_bytes: int | None = None, block_size: int = 16, seed: int | None = 0,
                 generation_config: str | None = "auto", skip_tokenizer_init: bool = False,
                 quantization: str | None = None, enable_prefix_caching: bool = True,
                 tensor_parallel_size: int = 1, enable_expert_parallel: bool = False,
                 speculative_config: dict | str | None = None):
        """`model`: a checkpoint folder, a hub id, with `load_format="dummy"` a preset name or a folder holding
        only config.json, or an already loaded `Qwen35Model`. `dtype` "auto": bfloat16 on a GPU and for FP8
        (checkpoints or `quantization="fp8"`: kept in 8 bits), else float32 on CPU. `tokenizer`: None (the
        checkpoint's, or the built-in Qwen3.5 vocabulary), a folder, or a tokenizer object.
        `skip_tokenizer_init`: no tokenizer at all (token ids in and out, `text` stays empty).
        `generation_config` "auto": sampling defaults and EOS ids from the checkpoint's
        generation_config.json; None: vLLM's neutral defaults. `quantization`: None, "int8" or "fp8" (weight-only,
        made at load; see `qwen35.ops.quant`; FP8 checkpoints need none). The cache arguments (and
        `enable_prefix_caching`, on by default as in vLLM) are `LLMEngine`'s. `tensor_parallel_size` N > 1: the
        model is split over N processes (this one and N-1 it starts on this host; or, under torchrun, the N it
        started, on one host or several: on ranks other than 0 this call serves rank 0 and then exits the
        process), each holding its share of every layer (qwen35.parallel.layout); gloo on CPU, NCCL on CUDA.
        `enable_expert_parallel`: MoE layers split by expert. `speculative_config`: vLLM's
        `{"method": "mtp", "num_speculative_tokens": k}`, k = 1..4: MTP speculative decoding with the checkpoint's
        own MTP layer (lossless: the same tokens as without it; `LLM.speculative_stats()` says how it went)."""
        from qwen35.engine.speculative import SpeculativeConfig
        from qwen35.tokenizer import load_tokenizer
        from qwen35.weights import load_model
        from qwen35.weights.gguf import gguf_tokenizer, is_gguf
        from qwen35.weights.hub import resolve_model_path
        from qwen35.weights.loader import auto_dtype

        folder: Path | None = None
        gguf_alone: Path | None = None  # a GGUF without tokenizer files beside it
        self.workers = None
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
        if not isinstance(enable_expert_parallel, bool):
            raise ValueError(f"enable_expert_parallel must be True or False, got {enable_expert_parallel!r}")
        spec = SpeculativeConfig.parse(speculative_config)  # a bad one fails before anything loads
        if spec is not None and tensor_parallel_size > 1:
            raise ValueError("speculative_config with tensor_parallel_size > 1 is not supported yet: run MTP "
                             "speculative decoding in one process")
        if tensor_parallel_size > 1 and isinstance(model, torch.nn.Module):
            raise ValueError("tensor_parallel_size > 1 needs a checkpoint path or a preset name (every rank loads "
                             "its own share), not a loaded model")
        if isinstance(model, torch.nn.Module):
            net = model
        else:
            name = str(model)
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if dtype == "auto":
                dtype = auto_dtype(name, device, load_format, quantization)
            tp = None
            if tensor_parallel_size > 1:
                from qwen35.parallel.layout import check_shardable
                from qwen35.parallel.workers import WorkerGroup, rank_device, torchrun_env

                check_shardable(_text_config(name, load_format), tensor_parallel_size, enable_expert_parallel)
                load = dict(path_or_id=name, dtype=dtype, device=device, load_format=load_format,
                            seed=seed if seed is not None else 0, quantization=quantization)
                launched = torchrun_env()
                if launched is not None:  # ranks other than 0 follow and exit inside join_torchrun
                    device = rank_device(device, launched[2])
                    self.workers = WorkerGroup.join_torchrun(tensor_parallel_size, enable_expert_parallel, load)
                else:
                    self.workers = WorkerGroup.start(tensor_parallel_size, enable_expert_parallel, load,
                                                     threads=torch.get_num_threads())
                tp = self.workers.tp
            try:
                net = load_model(name, dtype=dtype, device=device, load_format=load_format,
                                 seed=seed if seed is not None else 0, quantization=quantization, tensor_parallel=tp)
            except BaseException:
                self.close_workers()
                raise
            if Path(name).expanduser().is_dir():
                folder = Path(name).expanduser()
            elif is_gguf(name):  # tokenizer files beside the GGUF, else its own metadata (see gguf_tokenizer)
                beside = Path(name).expanduser().parent
                folder = beside if (beside / "tokenizer.json").is_file() else None
                gguf_alone = Path(name).expanduser() if folder is None else None
            elif load_format != "dummy" or (name.count("/") == 1 and not _is_preset(name)):
                folder = resolve_model_path(name, weights=False)
        self.model = net

        if skip_tokenizer_init:
            tokenizer = None
        elif tokenizer is None:
            if folder is not None:
                tokenizer = load_tokenizer(folder)
            elif gguf_alone is not None:
                tokenizer = gguf_tokenizer(gguf_alone, getattr(net, "gguf_vocabulary", None))
            else:  # a preset name or a bare module: the built-in Qwen3.5 vocabulary
                tokenizer = load_tokenizer(None)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer

        gen = load_generation_config(folder) if generation_config == "auto" else \
            load_generation_config(generation_config) if generation_config else {}
        self.default_sampling_params = SamplingParams.from_generation_config(gen)
        eos = eos_ids_from_generation_config(gen) or getattr(tokenizer, "eos_token_ids", None)
        self.engine = LLMEngine(net, tokenizer, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                kv_cache_memory_bytes=kv_cache_memory_bytes, block_size=block_size, seed=seed,
                                eos_token_ids=eos, default_sampling_params=self.default_sampling_params,
                                enable_prefix_caching=enable_prefix_caching, workers=self.workers,
                                speculative_config=spec)
        self.engine.prompts.model_folder = folder

    def speculative_stats(self) -> dict | None:
        """MTP speculative decoding so far: drafts, drafted and accepted tokens, acceptance (overall and by draft
        position), mean tokens per verify step; None when it is off."""
        stats = self.engine.spec_stats
        return stats.as_dict() if stats is not None else None

    def close_workers(self) -> None:
        """Stop the other ranks of a tensor-parallel LLM (also at exit); the LLM cannot generate after."""
        if self.workers is not None:
            self.workers.close()

    def __del__(self) -> None:
        try:
            self.close_workers()
        except Exception:  # interpreter shutdown
            pass

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's defaults (generation_config.json), used when no SamplingParams are given."""
        return self.default_sampling_params

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefixes (KV blocks and GDN snapshots); False when prefix caching is off."""
        return self.engine.reset_prefix_cache()

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; outputs in the order of the prompts. A prompt is a string, a list of token
        ids, or {"prompt_token_ids": [...]} / {"prompt": "..."}."""
        items = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(items))
        return self._run_to_end([(p, None, sp) for p, sp in zip(items, params, strict=True)], use_tqdm)

    def generate_stream(self, prompts: PromptType | Sequence[PromptType],
                        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                        ) -> Iterator[RequestOutput]:
        """Like `generate`, as an iterator of DELTA outputs (see the module docstring); requests interleave
        and are told apart by `request_id` (`req-<i>`... in order of the prompts, see `.request_ids`)."""
        items = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(items))
        return self._stream([(p, None, sp) for p, sp in zip(items, params, strict=True)])

    # ------------------------------------------------------------------------------------------ chat
    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *, use_tqdm: bool = True,
             tools: Sequence[Mapping[str, Any]] | None = None, chat_template: str | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None,
             add_generation_prompt: bool = True, tool_choice: str | Mapping[str, Any] | None = None,
             ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them and generate. Each completion also
        carries `reasoning_content`, `content` and `tool_calls` (OpenAI-shaped dicts) from the chat parsers.
        `tool_choice`: "auto" (default with tools), "none", "required" or {"type": "function", "function":
        {"name": ...}}, as the server's (see `qwen35.chat.frontend`)."""
        from qwen35.chat.frontend import read_choice

        convs = _as_conversation_list(messages)
        params = self._params_list(sampling_params, len(convs))
        items = [self._chat_item(c, sp, tools, tool_choice, chat_template, chat_template_kwargs,
                                 add_generation_prompt) for c, sp in zip(convs, params, strict=True)]
        outs = self._run_to_end(items, use_tqdm)
        for (_, plan, sp), out in zip(items, outs, strict=True):
            for c in out.outputs:
                parsed, c.finish_reason, c.stop_reason = read_choice(plan, c.text, c.finish_reason, c.stop_reason,
                                                                     sp.include_stop_str_in_output)
                c.reasoning_content, c.content, c.tool_calls = (parsed.reasoning_content, parsed.content,
                                                                 parsed.tool_calls)
        return outs

    def chat_stream(self, messages: Conversation | Sequence[Conversation],
                    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                    tools: Sequence[Mapping[str, Any]] | None = None, chat_template: str | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None,
                    add_generation_prompt: bool = True, tool_choice: str | Mapping[str, Any] | None = None,
                    ) -> Iterator[RequestOutput]:
        """`chat` as an iterator of DELTA outputs: each completion that moved holds its new `text` and the
        new `reasoning_content` / `content` (None when nothing new) and the tool calls completed in this step
        (`tool_calls`: OpenAI stream deltas, each call whole)."""
        convs = _as_conversation_list(messages)
        params = self._params_list(sampling_params, len(convs))
        items = [self._chat_item(c, sp, tools, tool_choice, chat_template, chat_template_kwargs,
                                 add_generation_prompt) for c, sp in zip(convs, params, strict=True)]
        return self._stream(items)

    def _chat_item(self, conversation: Conversation, params: SamplingParams, tools, tool_choice, chat_template,
                   chat_template_kwargs, add_generation_prompt) -> tuple[PromptType, Any, SamplingParams]:
        """(engine prompt, chat plan, sampling params) of one conversation, planned by the chat front end."""
        from qwen35.chat.frontend import ChatRequest, plan_chat

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (this LLM was made with skip_tokenizer_init=True)")
        kwargs = dict(chat_template_kwargs or {})
        thinking = kwargs.pop("enable_thinking", None)
        if thinking is not None and not isinstance(thinking, bool):
            kwargs["enable_thinking"], thinking = thinking, None
        plan = plan_chat(ChatRequest([dict(m) for m in conversation], tools=list(tools) if tools else None,
                                     tool_choice=dict(tool_choice) if isinstance(tool_choice, Mapping)
                                     else tool_choice, enable_thinking=thinking, template_kwargs=kwargs,
                                     add_generation_prompt=add_generation_prompt),
                         self.tokenizer, template=chat_template)
        extra = tuple(i for i in plan.extra_stop_ids if i not in params.stop_token_ids)
        if extra:
            params = params.clone(stop_token_ids=[*params.stop_token_ids, *extra])
        if plan.forced_call:  # the tool-call grammar (qwen35.engine.structured)
            from qwen35.engine.structured import structured_for_plan

            params = params.clone(structured_outputs=structured_for_plan(plan))
        prompt = plan.engine_prompt()
        if "multi_modal_data" not in prompt:
            prompt["prompt_token_ids"] = self.tokenizer.encode(plan.prompt)
        return prompt, plan, params

    # ------------------------------------------------------------------------------------------ driving
    def _params_list(self, params, n: int) -> list[SamplingParams]:
        return _params_list(self.default_sampling_params, params, n)

    def _add_all(self, items: list[tuple[PromptType, dict | None, SamplingParams]], kind: RequestOutputKind,
                 ) -> list[str]:
        # Tokenise and check everything first: a bad prompt in the middle must not leave the earlier ones queued.
        ready = []
        for prompt, _, sp in items:
            prepared = self.engine.prepare_prompt(prompt)
            self.engine.check_request(prepared.ids, sp)
            ready.append((prepared, sp.clone(output_kind=kind)))
        ids: list[str] = []
        try:
            for prompt, sp in ready:
                ids.append(self.engine.add_request(None, prompt, sp))
        except BaseException:
            self.engine.abort_request(ids)
            raise
        return ids

    def _run_to_end(self, items, use_tqdm: bool) -> list[RequestOutput]:
        ids = self._add_all(items, RequestOutputKind.FINAL_ONLY)
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", unit="req",
                   disable=not use_tqdm or len(ids) < PROGRESS_MIN_PROMPTS)
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.request_id in wanted and out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]

    def _stream(self, items) -> Iterator[RequestOutput]:
        from qwen35.chat.frontend import ChoiceReader

        ids = self._add_all(items, RequestOutputKind.DELTA)
        plans = {rid: (plan, sp) for rid, (_, plan, sp) in zip(ids, items, strict=True) if plan is not None}
        readers: dict[tuple[str, int], Any] = {}

        def generator() -> Iterator[RequestOutput]:
            pending = set(ids)
            try:
                while pending:
                    for out in self.engine.step():
                        if out.request_id not in pending:
                            continue
                        chat = plans.get(out.request_id)
                        if chat is not None:
                            for c in out.outputs:
                                key = (out.request_id, c.index)
                                if key not in readers:
                                    readers[key] = ChoiceReader(chat[0], chat[1].include_stop_str_in_output)
                                deltas = readers[key].feed(c.text)
                                if c.finish_reason is not None:
                                    last, c.finish_reason, c.stop_reason = readers[key].finish(c.finish_reason,
                                                                                               c.stop_reason)
                                    deltas += last
                                _merge_chat_deltas(c, deltas)
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
            finally:
                if pending:  # the caller stopped early (or an error): free what is still running
                    self.engine.abort_request(list(pending))

        return _StreamIterator(generator(), ids, self.engine)


class _StreamIterator:
    """An iterator of stream outputs that also knows the request ids, in the order of the prompts. Closing it
    (or dropping it) aborts the requests still running, even if it was never iterated."""

    def __init__(self, gen: Iterator[RequestOutput], request_ids: list[str], engine: LLMEngine):
        self._gen = gen
        self._engine = engine
        self.request_ids = request_ids

    def __iter__(self) -> _StreamIterator:
        return self

    def __next__(self) -> RequestOutput:
        return next(self._gen)

    def close(self) -> None:
        if inspect.getgeneratorstate(self._gen) == inspect.GEN_CREATED:  # its cleanup code never ran
            self._engine.abort_request(self.request_ids)
        self._gen.close()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __enter__(self) -> _StreamIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _merge_chat_deltas(c, deltas: list[dict[str, Any]]) -> None:
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in (d.get("tool_calls") or ())]
    c.reasoning_content = reasoning or None
    c.content = content or None
    c.tool_calls = calls or None


def _is_preset(name: str) -> bool:
    from qwen35.config import find_preset

    return find_preset(name) is not None


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        return [prompts] if prompts.dim() == 1 else [p for p in prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [items]  # one prompt given as token ids
    if not items:
        raise ValueError("no prompts given")
    return items


def _as_conversation_list(messages: Conversation | Sequence[Conversation]) -> list[Conversation]:
    items = list(messages)
    if not items:
        raise ValueError("no messages given")
    if all(isinstance(m, Mapping) for m in items):
        return [items]
    if all(isinstance(c, (list, tuple)) for c in items):
        return items
    raise ValueError("messages must be a conversation (a list of message dicts) or a list of conversations")


def _params_list(default: SamplingParams, params, n: int) -> list[SamplingParams]:
    if params is None:
        return [default] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams given for {n} prompts")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
    return params

__all__ = ["LLM"]


def _text_config(name: str, load_format: str):
    """The text config of a checkpoint path, hub id or preset (to check a tensor-parallel split up front)."""
    from qwen35.config import ModelConfig, find_preset
    from qwen35.weights.hub import resolve_model_path

    p = Path(name).expanduser()
    if p.is_dir():
        return ModelConfig.from_file(p).text
    preset = find_preset(name) if load_format == "dummy" else None
    if preset is not None:
        return preset.text
    return ModelConfig.from_file(resolve_model_path(name, weights=False)).text
