"""One forward for all the work of a step, over the hybrid cache, then sampling.

The scheduled tokens of every sequence are concatenated into one flat run (varlen); the model writes each
sequence's KV into its blocks and its GDN state into its slot. Logits are computed only for the sequences
that sample this step: those whose scheduled chunk reaches the end of their known tokens (a prefill chunk in
the middle of a prompt samples nothing), and, for requests that ask for prompt logprobs, over the prompt rows of
their chunk (each row's logits predict the next prompt token; the last row of a chunk predicts the first token of
the next chunk, which is already known). Those go through the head in blocks of rows, keeping only what is
reported, so a long prompt never holds [prompt_len, vocab] logits at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qwen35.engine.cache_manager import CachePlan
from qwen35.engine.sampler import Sampler, SamplerOutput, SamplerRow, screen_edits, screen_k
from qwen35.engine.sampling_plan import SamplingPlan
from qwen35.engine.scheduler import SchedulerOutput
from qwen35.engine.sequence import Sequence
from qwen35.model.cache import ForwardBatch, HybridCache, text_positions
from qwen35.multimodal.inputs import VisionFeatureCache
from qwen35.ops.hugepages import release_free_memory

# A step of this many tokens or more hands the heap's free pages back afterwards (malloc_trim: ~0.1 ms against a
# prefill chunk's seconds). glibc keeps a prompt's freed activations as holes in its heap, and the next prompt's
# peak stacks on top of them: on the 0.8B Q4_K_M, a 1K-token prefill's peak RSS 30 MB lower with it.
RELEASE_AFTER_TOKENS = 256
# Prompt logprobs: fp32 logits of at most this many bytes at a time (64 rows of the 248K vocabulary); the
# log-softmax of a block doubles it for a moment.
PROMPT_LOGPROB_BLOCK_BYTES = 64 << 20


@dataclass
class StepInput:
    """One step's forward in plain data: what every rank of a tensor-parallel group runs alike."""

    token_ids: torch.Tensor  # [N] the new tokens of every sequence, concatenated
    query_lens: list[int]
    context_lens: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    snapshots: dict[int, list[tuple[int, int]]]  # see ForwardBatch.snapshots
    positions: torch.Tensor | None = None  # [3, N]; None: text positions
    chains: dict[int, list[int]] = field(default_factory=dict)  # see ForwardBatch.chains (verify steps)
    # images / videos: the rows of the flat batch that take vision features, and those features (computed by
    # rank 0 alone; every rank embeds the tokens and places them: the embedding is vocab-parallel)
    vision_rows: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None
    head_rows: list[int] = field(default_factory=list)  # rows whose next token is wanted
    # over those rows: "greedy" (the argmax only), "logits" (fp32, for the sampler) or "top_k" (fp32 logits exact
    # at the tokens that may be among each row's k best, -inf elsewhere: ops/head_screen.py; one process only)
    head: str | None = None
    # "greedy" rows under a grammar: bool [V] of the tokens allowed (None: any), one per head row (structured output;
    # only without tensor parallelism: the masked argmax goes through this process's head screen)
    head_masks: list | None = None
    # prompt logprobs: rows whose next token is a known prompt token, that token, and how many of the best to keep
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_top: int = 0


@dataclass
class PromptLogprobRows:
    """What a step found for its prompt rows, row by row: the logprob of the prompt token that follows, its rank
    (1 = most likely), and the `prompt_top` best tokens with their logprobs (best first)."""

    token_logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class PromptSpan:
    """Which prompt positions of which sequence a run of `PromptLogprobRows` covers: rows `[row, row + count)`
    hold the entries of positions `[first, first + count)`."""

    seq: Sequence
    first: int
    count: int
    row: int


@torch.inference_mode()
def prompt_logprob_rows(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, top: int,
                        block_rows: int) -> PromptLogprobRows:
    """Log-softmax of the head over `hidden` [M, H] (fp32 logits, as the sampler's), `block_rows` rows at a time:
    the logprob and rank of `targets` [M] and the `top` best tokens of each row."""
    lps, ranks, top_ids, top_lps = [], [], [], []
    for b in range(0, hidden.shape[0], block_rows):
        logprobs = torch.log_softmax(model.compute_logits(hidden[b:b + block_rows], torch.float32), dim=-1)
        own = logprobs.gather(1, targets[b:b + block_rows, None])
        lps.extend(own[:, 0].tolist())
        ranks.extend(((logprobs > own).sum(dim=-1) + 1).tolist())
        if top:
            vals, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
            top_ids.extend(ids.tolist())
            top_lps.extend(vals.tolist())
        else:
            top_ids.extend([] for _ in range(own.shape[0]))
            top_lps.extend([] for _ in range(own.shape[0]))
        del logprobs
    return PromptLogprobRows(lps, ranks, top_ids, top_lps)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, plan: CachePlan, broadcast: Callable[[tuple], None] | None = None):
        """`broadcast`: under tensor parallelism, sends every step and cache copy to the other ranks (which
        run them alike: qwen35.parallel.workers) before this rank runs it."""
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        self.vocab_size = model.config.text.vocab_size
        # Storage only: the engine's CacheManager decides which region is a slot, a snapshot or KV blocks.
        self.cache = HybridCache(model.cache_config, plan.num_regions, plan.block_size, dtype=self.dtype,
                                 device=self.device, extra_attention_layers=plan.extra_attention_layers)
        self.sampler = Sampler()
        self.head_screen = model.enable_head_screen()
        # a sharded head finds the argmax per rank (Qwen35Model.greedy_tokens), as the screen does
        self.greedy_shortcut = self.head_screen or getattr(model, "tp", None) is not None
        self.vision_cache = VisionFeatureCache()
        self.broadcast = broadcast
        # the latest step's final hidden states and input, kept for the drafter (speculative decoding) only
        self.keep_hidden = False
        self._top_k: tuple[list[int], list[SamplerRow]] = ([], [])  # this step's k and rows, for a "top_k" head
        self.last_hidden: torch.Tensor | None = None
        self.last_step: StepInput | None = None
        # the latest `run`'s prompt logprobs (the engine takes them after the step): where they go, and the rows
        self.prompt_spans: list[PromptSpan] = []
        self.prompt_result: PromptLogprobRows | None = None
        self.prompt_block_rows = max(1, PROMPT_LOGPROB_BLOCK_BYTES // (4 * self.vocab_size))

    def copy_slot(self, src: int, dst: int) -> None:
        """The storage's copy_slot, on every rank."""
        if self.broadcast is not None:
            self.broadcast(("copy_slot", src, dst))
        self.cache.copy_slot(src, dst)

    def step_input(self, work: SchedulerOutput) -> StepInput:
        """The scheduled tokens as plain data (no head rows yet)."""
        ids: list[int] = []
        ctx: list[int] = []
        for i, (seq, n) in enumerate(zip(work.seqs, work.num_tokens, strict=True)):
            start = seq.num_computed_tokens
            drafts = work.drafts.get(i, ())
            ids.extend(seq.token_ids[start:start + n - len(drafts)])
            ids.extend(drafts)  # a verify step: its last token, then the drafts after it
            ctx.append(start)
        flat = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        step = StepInput(token_ids=flat, query_lens=list(work.num_tokens), context_lens=ctx,
                         slots=[s.slot for s in work.seqs], block_tables=[s.block_table for s in work.seqs],
                         snapshots={i: [(o, slot) for o, slot, _ in plan] for i, plan in work.snapshots.items()},
                         chains={i: list(work.seqs[i].draft_slots) for i in work.drafts})
        if any(s.request.mm is not None for s in work.seqs):
            step.positions, step.vision_rows, step.vision_features = self._multimodal_inputs(work, ctx)
        return step

    @torch.inference_mode()
    def execute(self, step: StepInput) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor | None]:
        """Run `step` over the cache (the GDN layers write the states `step.snapshots` asks for on the way):
        (the final hidden states [N, H], the batch, and the head's result over `step.head_rows`: greedy
        token ids, fp32 logits, or None)."""
        positions = step.positions
        if positions is None:
            positions = text_positions(step.context_lens, step.query_lens, self.device)
        batch = ForwardBatch(query_lens=step.query_lens, context_lens=step.context_lens, positions=positions,
                             cache=self.cache, slots=step.slots, block_tables=step.block_tables,
                             snapshots=step.snapshots, chains=step.chains or None)
        embeds = None
        if step.vision_rows is not None:
            embeds = self.model.model.embed_tokens(step.token_ids)
            embeds[step.vision_rows] = step.vision_features.to(embeds.dtype)
        hidden = self.model.forward_batch(step.token_ids, batch, inputs_embeds=embeds)
        if step.prompt_rows:  # on every rank alike: a sharded head gathers the logits
            rows = torch.as_tensor(step.prompt_rows, device=self.device)
            targets = torch.as_tensor(step.prompt_targets, dtype=torch.long, device=self.device)
            self.prompt_result = prompt_logprob_rows(self.model, hidden[rows], targets, step.prompt_top,
                                                     self.prompt_block_rows)
        if step.token_ids.numel() >= RELEASE_AFTER_TOKENS:
            release_free_memory()
        if step.head is None or not step.head_rows:
            return hidden, batch, None
        last = hidden[torch.as_tensor(step.head_rows, device=self.device)]
        if step.head == "greedy":
            if step.head_masks is not None:
                return hidden, batch, self._masked_greedy_tokens(last, step.head_masks)
            return hidden, batch, self.model.greedy_tokens(last)
        if step.head == "top_k":  # one process only (set by `run`): the sampler's rows are at hand
            ks, rows = self._top_k
            screen = self.model._usable_head_screen()
            logits = None
            if screen is not None:
                V = screen.weight.shape[0]
                edits = [screen_edits(r, V) for r in rows]
                logits = screen.top_k_fused(last, ks, [e for e, _ in edits], [i for _, i in edits])
            if logits is not None:
                return hidden, batch, logits
        return hidden, batch, self.model.compute_logits(last, torch.float32)

    def _run_step(self, step: StepInput):
        if self.broadcast is not None:
            self.broadcast(("step", step))
        return self.execute(step)

    @torch.inference_mode()
    def forward(self, work: SchedulerOutput) -> tuple[torch.Tensor, ForwardBatch]:
        """Forward the scheduled tokens over the cache: the final hidden states [N, H] of the flat batch, and
        the batch."""
        hidden, batch, _ = self._run_step(self.step_input(work))
        return hidden, batch

    @torch.inference_mode()
    def run(self, work: SchedulerOutput, plan: SamplingPlan) -> SamplerOutput | None:
        """Forward, then sample the rows of `plan` (engine/sampling_plan.py). Returns the sampler's result: one
        token per row, `rows` per sequence when a step verified drafts; None when nothing samples. The final
        hidden states stay in `last_hidden` for the drafter."""
        step = self.step_input(work)
        self._plan_prompt_logprobs(work, step)
        rows = plan.rows
        if rows:  # greedy steps: the argmax without the full logits (exact; ops/head_screen.py, or per rank)
            step.head_rows = list(plan.head_rows)
            step.head = "greedy" if self.greedy_shortcut and all(r.argmax_only for r in rows) else "logits"
            one_process = self.head_screen and getattr(self.model, "tp", None) is None
            if any(r.allowed is not None for r in rows):
                # grammar rows: greedy ones through the head screen with their masks (exact: the screen rules out
                # only rows whose bounds lie below an allowed row's), else the sampler masks the full logits
                if step.head == "greedy" and one_process:
                    step.head_masks = [r.allowed for r in rows]
                else:
                    step.head = "logits"
            if step.head == "logits" and one_process:
                # sampled rows that need only their k best logits (top_k, no logprobs): through the screen too
                ks = [screen_k(r) for r in rows]
                if all(k is not None for k in ks):
                    step.head, self._top_k = "top_k", (ks, rows)
        hidden, _, out = self._run_step(step)
        self._top_k = ([], [])
        if self.keep_hidden:
            self.last_hidden, self.last_step = hidden, step
        if not rows:
            return None
        if step.head == "greedy":
            result = SamplerOutput(out.tolist(), [None] * len(rows), [None] * len(rows))
        else:
            result = self.sampler(out, rows)
        if plan.verified:
            result.rows = list(plan.per_seq)
        return result

    def _plan_prompt_logprobs(self, work: SchedulerOutput, step: StepInput) -> None:
        """The prompt rows of this step for the requests that want prompt logprobs, into `step` and
        `prompt_spans`: in each such chunk, the rows whose next token is a prompt position no sequence of the
        request has computed yet (its n sequences share one list; a recomputed, preempted one adds nothing)."""
        self.prompt_spans, self.prompt_result = [], None
        claimed: dict[int, int] = {}  # id(request) -> positions taken so far (several of its sequences this step)
        at = 0
        for seq, n in zip(work.seqs, work.num_tokens, strict=True):
            req = seq.request
            if req.prompt_logprobs is not None:
                start = seq.num_computed_tokens
                first = max(claimed.get(id(req), 0), len(req.prompt_logprobs))
                last = min(start + n, seq.num_prompt_tokens - 1)  # the last position a row of this chunk predicts
                if last >= first:
                    # rows hold positions start..start+n-1; row j predicts position j+1 (first > start always:
                    # positions up to this sequence's own context were filled before)
                    row = at + first - 1 - start
                    self.prompt_spans.append(PromptSpan(seq, first, last - first + 1, len(step.prompt_rows)))
                    step.prompt_rows.extend(range(row, row + last - first + 1))
                    step.prompt_targets.extend(seq.token_ids[first:last + 1])
                    step.prompt_top = max(step.prompt_top, req.params.prompt_logprobs or 0)
                    claimed[id(req)] = last + 1
            at += n

    def _masked_greedy_tokens(self, last: torch.Tensor, masks: list) -> torch.Tensor:
        """[M] argmax of each row's fp32 logits over its allowed tokens (all tokens where its mask is None)."""
        tokens = torch.empty(last.shape[0], dtype=torch.long)
        free = [i for i, m in enumerate(masks) if m is None]
        held = [i for i, m in enumerate(masks) if m is not None]
        if free:
            tokens[free] = self.model.greedy_tokens(last[free]).cpu()
        if held:
            screen = self.model._usable_head_screen()
            x = last[held]
            allowed = torch.stack([masks[i] for i in held])
            if screen is not None:
                tokens[held] = screen.masked_argmax(x, allowed)
            else:  # the screen went stale (the head was written): the full logits, masked
                logits = self.model.compute_logits(x, torch.float32)
                tokens[held] = logits.masked_fill(~allowed[:, :logits.shape[-1]], float("-inf")).argmax(-1).cpu()
        return tokens

    def _multimodal_inputs(self, work: SchedulerOutput, ctx: list[int],
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """M-RoPE positions, and the flat rows that take vision features with those features, for a step that
        holds image / video prompts. A chunk may start or end inside an image: each token takes its own row."""
        positions, rows_all, feats, at = [], [], [], 0
        for seq, start, n in zip(work.seqs, ctx, work.num_tokens, strict=True):
            mm = seq.request.mm
            if mm is None:
                positions.append(text_positions([start], [n], self.device))
            else:
                positions.append(mm.positions_for(start, start + n).to(self.device))
                index = mm.feature_index[start:min(start + n, seq.num_prompt_tokens)]
                rows = (index >= 0).nonzero().flatten()
                if len(rows):
                    if seq.request.mm_features is None:  # encoded once per request, on first need
                        seq.request.mm_features = self.vision_cache.for_prompt(self.model, mm)
                    rows_all.append(at + rows.to(self.device))
                    feats.append(seq.request.mm_features[index[rows]])
            at += n
        hidden = self.model.config.text.hidden_size
        rows = torch.cat(rows_all) if rows_all else torch.zeros(0, dtype=torch.long, device=self.device)
        features = torch.cat(feats) if feats else torch.zeros(0, hidden, dtype=self.dtype, device=self.device)
        return torch.cat(positions, dim=1), rows, features
