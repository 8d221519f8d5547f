"""`LLMEngine`: requests in, outputs out, one `step()` at a time.

    engine = LLMEngine(model, tokenizer, max_num_seqs=..., kv_cache_memory_bytes=...)
    rid = engine.add_request(None, "Hello", SamplingParams(max_tokens=8, output_kind="delta"))
    while engine.has_unfinished_requests():
        for out in engine.step():           # RequestOutputs of the requests that moved this step
            print(out.outputs[0].text, end="")
    engine.abort_request(rid)               # frees its slot and blocks at once

`step()` is schedule -> plan (which rows sample, how: engine/sampling_plan.py) -> run (forward + sample:
engine/model_runner.py) -> postprocess (tokens in, stop rules: engine/stops.py; the cache's bookkeeping; outputs:
engine/reporting.py). Prompts are tokenised and checked in engine/prompts.py before they are queued.
`add_request`, `abort_request` and `step` may be called from
different threads (one lock); a server runs `step()` in one thread and adds/aborts from others.
What a request reports each step follows its `SamplingParams.output_kind`: everything so far (CUMULATIVE),
what is new (DELTA, for streaming) or one final output (FINAL_ONLY). An aborted request reports once more,
with `finish_reason="abort"`.

A request with `SamplingParams.prompt_logprobs` gets `RequestOutput.prompt_logprobs`, computed in its prompt's
forward (model_runner). It does not start from the prefix cache, as in vLLM: cached positions were never run
through the head, so it computes its whole prompt (and its blocks are still cached for later requests).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch

from qwen35.engine.cache_manager import (
    CacheManager,
    CachePlan,
    default_cache_budget,
    plan_cache,
)
from qwen35.engine.detokenize import OutputText
from qwen35.engine.model_runner import ModelRunner
from qwen35.engine.outputs import Logprob, RequestOutput
from qwen35.engine.prefix_cache import SNAPSHOT_GRID
from qwen35.engine.prompts import MAX_LOGPROBS, PreparedPrompt, PromptPreparer, PromptType
from qwen35.engine.reporting import request_output
from qwen35.engine.sampler import SamplerOutput, keyed_noise
from qwen35.engine.sampling import SamplingParams
from qwen35.engine.sampling_plan import plan_sampling
from qwen35.engine.scheduler import Scheduler, SchedulerOutput
from qwen35.engine.sequence import Request, SequenceStatus
from qwen35.engine.sequence import Sequence as Seq
from qwen35.engine.speculative import (
    DraftWork,
    MTPDrafter,
    SpecDecodeStats,
    SpeculativeConfig,
    accepted_prefix,
    require_mtp,
)
from qwen35.engine.stops import append_token
from qwen35.model.cache import text_positions
from qwen35.tokenizer import DEFAULT_EOS_TOKEN_IDS

log = logging.getLogger("qwen35")

HIT_LOG_SECONDS = 60.0  # how often the prefix cache's hit rate is logged (while requests come)


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: Any | None = None, *, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 kv_cache_memory_bytes: int | None = None, block_size: int = 16, seed: int | None = 0,
                 eos_token_ids: Iterable[int] | None = None,
                 default_sampling_params: SamplingParams | None = None, enable_prefix_caching: bool = True,
                 workers: Any = None, speculative_config: Any = None):
        """`model`: a `Qwen35Model`. `tokenizer`: a `qwen35.tokenizer.Tokenizer` (None: token ids in, no text
        out). `max_model_len`: prompt + output tokens of one sequence (default: the model's
        `max_position_embeddings`, lowered to what the cache holds). `kv_cache_memory_bytes`: the cache budget
        (KV blocks + GDN state slots; default: 90% of free GPU memory, or a quarter of available RAM capped at
        4 GiB on CPU). `max_num_batched_tokens`: tokens per step (default 2048; prompts longer than that are
        prefilled in chunks). `seed`: where the random streams of unseeded requests come from.
        `enable_prefix_caching`: requests that begin with the tokens of an earlier one start from its cached KV
        blocks and GDN state snapshot (see engine/cache_manager.py); the state slots no running sequence holds
        keep the snapshots. `speculative_config`: vLLM's `{"method": "mtp", "num_speculative_tokens": k}` (k = 1..4):
        the checkpoint's MTP layer drafts k tokens that the model verifies in one step (engine/speculative.py;
        lossless: the same tokens as without it)."""
        cfg = model.cache_config  # this process's share of the model under tensor parallelism
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = cfg.vocab_size
        if tokenizer is not None and eos_token_ids is None:
            eos_token_ids = getattr(tokenizer, "eos_token_ids", None)
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids else DEFAULT_EOS_TOKEN_IDS
        self.default_sampling_params = default_sampling_params or SamplingParams()

        for name, v in (("max_num_seqs", max_num_seqs), ("block_size", block_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 2048
        if not isinstance(max_num_batched_tokens, int) or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be a positive integer, got {max_num_batched_tokens!r}")
        if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {max_model_len!r}")

        dtype, device = model.dtype, model.device
        budget_given = kv_cache_memory_bytes is not None
        if kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = default_cache_budget(device)
        if not isinstance(kv_cache_memory_bytes, int) or kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be a positive integer, got {kv_cache_memory_bytes!r}")
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}")
        if enable_prefix_caching and SNAPSHOT_GRID % block_size:
            raise ValueError(f"block_size={block_size}: with prefix caching it must divide the snapshot grid of "
                             f"{SNAPSHOT_GRID} tokens (e.g. 16, the default)")
        self.spec = SpeculativeConfig.parse(speculative_config)
        if self.spec is not None and workers is not None:
            raise ValueError("speculative_config with tensor_parallel_size > 1 is not supported yet: run MTP "
                             "speculative decoding in one process")
        if self.spec is not None:
            require_mtp(model)  # before the cache is allocated
        # one pool: KV blocks, the running sequences' states and the prefix cache's snapshots (and with MTP its
        # layer's KV, as one more attention layer)
        self.plan: CachePlan = plan_cache(cfg, dtype, kv_cache_memory_bytes, max_num_seqs, max_model_len,
                                          block_size, extra_attention_layers=1 if self.spec is not None else 0)
        if max_model_len is None and self.plan.max_model_len < cfg.max_position_embeddings:
            log.info("max_model_len lowered to %d tokens: what the %s cache budget holds next to one state slot",
                     self.plan.max_model_len, "given" if budget_given else "default")
        self.max_model_len = max_model_len = self.plan.max_model_len
        self.max_num_seqs = min(max_num_seqs, self.plan.num_regions)
        self.workers = workers  # a qwen35.parallel.workers.WorkerGroup: the other ranks of a sharded model
        if workers is not None:
            workers.broadcast(("setup", self.plan))
        self.runner = ModelRunner(model, self.plan, broadcast=workers.broadcast if workers is not None else None)
        self.cache = CacheManager.for_plan(self.plan, enable_prefix_caching, copy_slot=self.runner.copy_slot)
        self.scheduler = Scheduler(self.cache, self.max_num_seqs, max_num_batched_tokens)
        self.drafter: MTPDrafter | None = None
        self.spec_stats: SpecDecodeStats | None = None
        if self.spec is not None:
            self.drafter = MTPDrafter(model, self.runner.cache, self.spec.num_speculative_tokens)
            self.spec_stats = SpecDecodeStats(self.spec.num_speculative_tokens)
            self.runner.keep_hidden = True
        # draft_override(seq, drafts) -> the drafts to verify instead (tests and benchmarks: known continuations at
        # a chosen acceptance, with the MTP layer still run, so that its cost stays in the step)
        self.draft_override: Any = None
        self._deferred: list[Seq] | None = None  # finishes held back while a step settles
        self._hit_log_time = time.monotonic()
        self.prompts = PromptPreparer(tokenizer, self.vocab_size, model)
        log.info("cache: %d regions of %.2f MiB (%.1f MiB), each a GDN state or %d KV blocks of %d tokens; "
                 "max_model_len %d; prefix caching %s", self.plan.num_regions, self.plan.region_bytes / 2**20,
                 self.plan.total_bytes / 2**20, self.plan.blocks_per_region, block_size, max_model_len,
                 "on" if enable_prefix_caching else "off")

        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._to_report: list[Request] = []  # aborted, or finished when added: they report at the next step

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    *, prompt_text: str | None = None) -> str:
        """Queue a request; returns its id. `prompt`: text, token ids, or {"prompt_token_ids": [...]} /
        {"prompt": "..."}. Raises ValueError (and changes nothing) for an invalid request."""
        params = self.default_sampling_params if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, ids, mm = self.prompts.prepare(prompt)
        if prompt_text is not None:
            text = prompt_text
        self.check_request(ids, params)
        grammars = self.compile_grammar(params)  # compiles (or finds cached) before the lock: ValueError if bad
        with self._lock:
            if request_id is None:
                request_id = f"req-{next(self._request_ids)}"
                while request_id in self._requests:
                    request_id = f"req-{next(self._request_ids)}"
            elif request_id in self._requests:
                raise ValueError(f"request_id {request_id!r} is already in use")
            req = Request(request_id=str(request_id), prompt=text, prompt_token_ids=list(ids), params=params, mm=mm)
            if params.prompt_logprobs is not None:
                req.prompt_logprobs = [None]  # the first prompt token has no prediction
            thinking = self.prompts.opens_thinking(ids)
            for index in range(params.n):
                seed = self._noise_seed(params, index)
                seq = Seq(seq_id=next(self._seq_ids), request=req, index=index, token_ids=list(ids),
                          num_prompt_tokens=len(ids), noise_seed=seed,
                          generator=None if seed is None or keyed_noise(params) else
                          torch.Generator(device=self.runner.device).manual_seed(seed),
                          text=OutputText(self.tokenizer, params.stop, params.skip_special_tokens,
                                          params.include_stop_str_in_output))
                req.sequences.append(seq)
                if grammars is not None:  # each completion its own matcher; after </think> when thinking
                    seq.grammar = grammars.new_state(params.structured_outputs, thinking=thinking,
                                                     stop_token_ids=params.stop_token_ids)
                if params.thinking_budget is not None:
                    from qwen35.chat import ThinkingBudget

                    seq.thinking_budget = ThinkingBudget.for_tokenizer(self.tokenizer, params.thinking_budget,
                                                                       thinking=thinking)
                    for tok in seq.thinking_budget.initial() or ():
                        if not seq.is_finished:
                            self._append_token(seq, tok, None, None, forced=True)
            self._requests[req.request_id] = req
            for seq in req.sequences:
                if seq.is_finished:  # a forced start that already ended it (max_tokens=1 ...)
                    seq.status = SequenceStatus.FINISHED
                else:
                    self.scheduler.add(seq)
            if req.finished:
                self._to_report.append(req)
            return req.request_id

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests now and free their slots and blocks; unknown or finished ids are ignored. Each aborted
        request reports once more from `step()`, with finish_reason "abort"."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock:
            for rid in ids:
                req = self._requests.get(rid)
                if req is None or req.finished:
                    continue
                for seq in req.sequences:
                    if not seq.is_finished:
                        self._finish(seq, "abort")
                self._to_report.append(req)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests) or bool(self._to_report)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests.values() if not r.finished)

    # ------------------------------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one batch: schedule, forward + sample, update the sequences. Returns the outputs of the
        requests that moved (per their output_kind)."""
        with self._lock:
            work = self.scheduler.schedule()
            if work.empty:
                if self.scheduler.has_work():
                    raise RuntimeError("scheduler made no progress although requests wait (a bug: please report)")
                return self._postprocess(work, [], None)
            work.snapshots = self.cache.plan_snapshots(work.seqs, work.num_tokens)
            try:
                plan = plan_sampling(work, self.eos_token_ids, self.runner.vocab_size, self.runner.device)
                sampled = self.runner.run(work, plan)
            except BaseException as e:
                self.cache.drop_snapshots(work.snapshots)  # the slots they took go back
                for seq in work.seqs:  # and the verify step's draft slots
                    if seq.draft_slots:
                        self.cache.settle_draft_slots(seq, 1)
                if self.workers is not None and not isinstance(e, ValueError | KeyboardInterrupt):
                    self.workers.failed(e)  # raises RankLost: the other ranks may be mid-step
                raise
            self._record_prompt_logprobs()
            return self._postprocess(work, plan.seqs, sampled)

    def _postprocess(self, work: SchedulerOutput, seqs: list[Seq], sampled: SamplerOutput | None,
                     ) -> list[RequestOutput]:
        drafts_of = {id(work.seqs[i]): d for i, d in work.drafts.items()}
        kept: dict[int, int] = {}  # a verify step's sequences: how many of their rows stay in the cache
        moved: dict[str, Request] = {}
        now = time.monotonic()
        self._deferred = []  # finishes wait until the cache has counted what this step computed
        try:
            at = 0
            for i, seq in enumerate(seqs):
                assert sampled is not None
                r = sampled.rows[i] if sampled.rows is not None else 1
                drafts = drafts_of.get(id(seq), ())
                targets = sampled.token_ids[at:at + r]
                # the target's token at each position; a draft stays while the target agrees with it
                n_ok = accepted_prefix(targets, list(drafts)) if drafts else 0
                used = 0
                for j in range(n_ok + 1):
                    used = j + 1
                    if self._append_sampled(seq, targets[j], sampled.logprobs[at + j], sampled.top_logprobs[at + j]):
                        break  # it finished, or the engine put tokens of its own after this one
                if seq.pending_noise and not seq.params.greedy:
                    del seq.pending_noise[:used]  # the noise rows of the positions kept; the rest wait
                if drafts:
                    kept[id(seq)] = used
                    self.spec_stats.record(len(drafts), n_ok)
                at += r
                if seq.request.first_token_time is None:
                    seq.request.first_token_time = now
                moved[seq.request.request_id] = seq.request
            for seq, n in zip(work.seqs, work.num_tokens, strict=True):
                if id(seq) in kept:
                    if seq.finish_reason is None:
                        self.cache.settle_draft_slots(seq, kept[id(seq)])
                    n = kept[id(seq)]
                seq.num_computed_tokens += n
                self.cache.cache_computed(seq)
            if work.snapshots:
                self.cache.commit_snapshots(work.snapshots)
        finally:
            deferred, self._deferred = self._deferred, None
            for seq in deferred:
                self.scheduler.finish(seq)
        if self.drafter is not None:
            self._propose(work, kept)
        self._log_hit_rate()
        for req in self._to_report:
            moved[req.request_id] = req
        self._to_report = []

        outputs = []
        for req in moved.values():
            out = request_output(req)
            if out is not None:
                outputs.append(out)
            if req.finished:
                req.finished_time = now
                self._requests.pop(req.request_id, None)
        return outputs

    def _record_prompt_logprobs(self) -> None:
        """The prompt logprobs the step's forward computed, into their requests' lists (positions in order: a
        request's sequences compute its prompt front to back, and the runner only asks for positions not yet
        filled)."""
        spans, rows = self.runner.prompt_spans, self.runner.prompt_result
        self.runner.prompt_spans, self.runner.prompt_result = [], None
        for span in spans:
            entries = span.seq.request.prompt_logprobs
            if entries is None or len(entries) != span.first:
                raise RuntimeError(f"prompt logprobs of position {span.first} computed after {len(entries or ())} "
                                   f"positions (a bug: please report)")
            for r in range(span.row, span.row + span.count):
                tok = span.seq.token_ids[span.first + r - span.row]
                d = {t: Logprob(v, rank) for rank, (t, v) in
                     enumerate(zip(rows.top_ids[r], rows.top_logprobs[r], strict=True), start=1)}
                if tok not in d:
                    d[tok] = Logprob(rows.token_logprobs[r], rows.ranks[r])
                if self.tokenizer is not None:
                    for t, lp in d.items():
                        lp.decoded_token = self.tokenizer.decode([t], skip_special_tokens=False) \
                            if t < self.tokenizer.vocab_size else ""
                entries.append(d)

    def _append_sampled(self, seq: Seq, tok: int, logprob: float | None, top: dict[int, Logprob] | None) -> bool:
        """Append a sampled token and what the thinking budget adds after it; True when the sequence finished or
        the budget added tokens (later drafts of a verify step no longer follow)."""
        self._append_token(seq, tok, logprob, top)
        budget = seq.thinking_budget
        added = False
        if budget is not None and seq.finish_reason is None:
            for forced in budget.step(tok) or ():
                if seq.finish_reason is not None:
                    break
                self._append_token(seq, forced, None, None, forced=True)
                added = True
        return added or seq.finish_reason is not None

    def _propose(self, work: SchedulerOutput, kept: dict[int, int]) -> None:
        """The MTP layer over every row this step committed, then drafts for the sequences that decode next."""
        step = self.runner.last_step
        if step is None or not work.seqs:  # nothing ran (an empty step)
            return
        positions = step.positions if step.positions is not None else \
            text_positions(step.context_lens, step.query_lens, self.runner.device)
        items, row = [], 0
        reserve = len(self.scheduler.running)
        for seq, n in zip(work.seqs, work.num_tokens, strict=True):
            if seq.finish_reason is None and seq.status == SequenceStatus.RUNNING:
                k = kept.get(id(seq), n)
                nd = 0
                # a sequence under a grammar gets no drafts: its mask is known for one position at a time
                if seq.num_uncomputed_tokens == 1 and seq.grammar is None:
                    # no drafts past max_tokens or max_model_len: a verify step makes at most drafts + 1 tokens
                    k_max = self.spec.num_speculative_tokens
                    p = seq.params
                    left = p.max_tokens - seq.num_output_tokens if p.max_tokens is not None else k_max + 1
                    nd = max(0, min(k_max, left - 1, self.max_model_len - seq.num_tokens))
                    # the chain's own positions need KV room (the MTP layer's), without squeezing anyone
                    while nd > 1 and not self.cache.can_allocate(seq, seq.num_tokens + nd - 2, reserve_blocks=reserve):
                        nd -= 1
                    if nd > 1:
                        self.cache.allocate(seq, seq.num_tokens + nd - 2)
                items.append(DraftWork(seq, row, seq.num_computed_tokens - k, k, nd))
            row += n
        drafts = self.drafter.propose(self.runner.last_hidden, positions, items)
        for item, d in zip(items, drafts, strict=True):
            if self.draft_override is not None and item.num_drafts:
                d = list(self.draft_override(item.seq, d))[:item.num_drafts]
            item.seq.draft_ids = d
        self.runner.last_hidden = self.runner.last_step = None

    def _log_hit_rate(self) -> None:
        prefix = self.cache.prefix
        now = time.monotonic()
        if prefix is None or now - self._hit_log_time < HIT_LOG_SECONDS or not prefix.queried_tokens:
            return
        self._hit_log_time = now
        log.info("prefix cache: %.1f%% of %d prompt tokens hit; %d cached blocks, %d snapshots",
                 100 * prefix.hit_tokens / prefix.queried_tokens, prefix.queried_tokens, len(prefix.key_of),
                 len(prefix.snapshots))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block and snapshot; False when prefix caching is off."""
        with self._lock:
            self.cache.reset_prefix_cache()
            return self.cache.prefix_caching

    def prefix_cache_stats(self) -> dict[str, int]:
        """Prompt tokens looked up and found cached so far (first admissions), cached blocks and snapshots."""
        prefix = self.cache.prefix
        if prefix is None:
            return {"queried_tokens": 0, "hit_tokens": 0, "cached_blocks": 0, "snapshots": 0}
        return {"queried_tokens": prefix.queried_tokens, "hit_tokens": prefix.hit_tokens,
                "cached_blocks": len(prefix.key_of), "snapshots": len(prefix.snapshots)}

    # ------------------------------------------------------------------------------------------ tokens
    def _append_token(self, seq: Seq, tok: int, logprob: float | None, top: dict[int, Logprob] | None,
                      forced: bool = False) -> None:
        """Add one generated token to `seq`, and finish it where a stop rule says so (engine/stops.py)."""
        finish = append_token(seq, tok, logprob, top, eos_token_ids=self.eos_token_ids,
                              max_model_len=self.max_model_len, tokenizer=self.tokenizer, forced=forced)
        if finish is not None:
            self._finish(seq, finish.reason, finish.stop_reason)

    def _finish(self, seq: Seq, reason: str, stop_reason: int | str | None = None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.text.finish()
        if self._deferred is not None:  # inside a step's bookkeeping: freed once the cache has counted the step
            self._deferred.append(seq)
        else:
            self.scheduler.finish(seq)

    # ------------------------------------------------------------------------------------------ checks
    def prepare_prompt(self, prompt: PromptType) -> PreparedPrompt:
        """Tokenise a prompt (engine/prompts.py): text, token ids, or a dict, also with `multi_modal_data`."""
        return self.prompts.prepare(prompt)

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """ValueError for a prompt or parameters this engine cannot run (engine/prompts.py)."""
        self.prompts.check(ids, params, self.max_model_len)

    def compile_grammar(self, params: SamplingParams):
        """The compiler of this engine's tokenizer with `params`' grammar compiled in it (None without one);
        ValueError naming the field when it does not compile. `add_request` calls it; a server calls it first in
        a worker thread, so that a bad grammar is a 400 and the engine's thread finds the grammar compiled."""
        return self.prompts.compile_grammar(params, self.eos_token_ids)

    def _noise_seed(self, params: SamplingParams, index: int) -> int | None:
        """The seed of a sampling sequence's randomness (None for greedy ones: they draw none)."""
        if params.greedy:
            return None
        return params.seed + index if params.seed is not None else self._rng.getrandbits(63)

    # ------------------------------------------------------------------------------------------ state
    def get_default_sampling_params(self) -> SamplingParams:
        return self.default_sampling_params

    def cache_usage(self) -> dict[str, int]:
        """The pool (for monitoring and tests), in KV blocks and in regions: `num_blocks` / `num_slots` what it
        holds of each when it holds nothing else; `held_blocks` / `live_slots` what running sequences hold;
        `free_blocks` / `free_slots` what they could still get (the prefix cache's memory counts as free)."""
        cm = self.cache
        return {"free_blocks": cm.num_free_blocks, "held_blocks": cm.num_held_blocks, "num_blocks": cm.num_blocks,
                "free_slots": cm.num_free_slots, "live_slots": cm.num_live_slots, "num_slots": cm.num_regions,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting)}


__all__ = ["DEFAULT_EOS_TOKEN_IDS", "MAX_LOGPROBS", "LLMEngine", "PreparedPrompt", "PromptType"]
