"""The hybrid cache, through the engine's own allocator and runner (`qwen35.engine.direct`): any split of a
prompt, then token-by-token decode, equals one forward; many sequences in one varlen forward equal each alone;
a reused region (state slot or KV blocks before) never leaks."""

from __future__ import annotations

import pytest
import torch

import qwen35
from conftest import TEXT_IDS, assert_logits_close, hf_logits, make_hf_model, save_hf
from qwen35.engine.direct import DirectRun
from qwen35.model import ForwardBatch


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    ref = make_hf_model("cg", moe=request.param == "moe")
    return ref, qwen35.load_model(save_hf(ref, tmp_path_factory.mktemp(request.param)))


def run_pieces(model, run: DirectRun, i: int, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Feed `ids` to sequence i in pieces of the given sizes; return the logits of every token."""
    out, at = [], 0
    for n in pieces:
        hidden, _ = run.forward({i: ids[at:at + n].tolist()})
        at += n
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


@pytest.mark.parametrize("pieces", [[150], [1] * 20 + [130], [64, 64, 22], [63, 2, 70, 15], [100, 1, 1, 1, 47]])
def test_any_split_then_decode_equals_one_forward(pair, pieces):
    ref, model = pair
    total = sum(pieces)
    ids = torch.randint(0, TEXT_IDS, (total,), generator=torch.Generator().manual_seed(total))
    whole = hf_logits(ref, ids[None])[0]
    run = DirectRun(model, num_seqs=2, max_len=512)
    assert_logits_close(run_pieces(model, run, 0, ids, pieces), whole)


def test_mixed_varlen_batch_equals_each_alone(pair):
    """One forward holding a fresh prefill, a continued prefill chunk and two single-token decodes."""
    ref, model = pair
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, TEXT_IDS, (n,), generator=gen) for n in (90, 40, 7, 66)]
    run = DirectRun(model, num_seqs=4, max_len=256)
    # Warm up: sequences 1..3 already hold part of their prompt.
    done = [0, 25, 6, 65]
    for i, (p, d) in enumerate(zip(prompts, done, strict=True)):
        if d:
            run_pieces(model, run, i, p, [d])
    new = [p[d:] for p, d in zip(prompts, done, strict=True)]  # 90, 15, 1, 1 tokens
    hidden, _ = run.forward({i: x.tolist() for i, x in enumerate(new)})
    logits = model.compute_logits(hidden)
    at = 0
    for p, x in zip(prompts, new, strict=True):
        whole = hf_logits(ref, p[None])[0]
        assert_logits_close(logits[at:at + len(x)], whole[len(p) - len(x):])
        at += len(x)


def test_batched_decode_equals_each_alone(pair):
    ref, model = pair
    gen = torch.Generator().manual_seed(5)
    seqs_ids = [torch.randint(0, TEXT_IDS, (n + 4,), generator=gen) for n in (3, 50, 17)]
    run = DirectRun(model, num_seqs=3, max_len=256)
    for i, ids in enumerate(seqs_ids):
        run_pieces(model, run, i, ids, [len(ids) - 4])
    for step in range(4):
        hidden, _ = run.forward({i: [int(ids[len(ids) - 4 + step])] for i, ids in enumerate(seqs_ids)})
        logits = model.compute_logits(hidden)
        for i, ids in enumerate(seqs_ids):
            n = len(ids) - 4 + step + 1
            assert_logits_close(logits[i], hf_logits(ref, ids[None, :n])[0, -1])


def test_reused_slot_starts_clean(pair):
    """Regions freed by one sequence and taken by the next hold stale data (its state, or KV where the new
    one keeps its state, and the other way round): it must not leak."""
    _, model = pair
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randint(0, TEXT_IDS, (120,), generator=gen), torch.randint(0, TEXT_IDS, (30,), generator=gen)
    run = DirectRun(model, num_seqs=1, max_len=256)
    fresh = model.compute_logits(model.forward_batch(
        b, ForwardBatch(query_lens=[30], context_lens=[0], positions=qwen35.model.text_positions([0], [30]))))
    run_pieces(model, run, 0, a, [120])
    used = {run.seqs[0].slot, *(run.manager.region_of(x) for x in run.seqs[0].block_table)}
    run.restart(0)
    run.cache.buffer.fill_(0x7F)  # what a region held before: here, large finite garbage
    for single_tokens in (False, True):
        pieces = [1] * 30 if single_tokens else [30]
        got = run_pieces(model, run, 0, b, pieces)
        assert run.seqs[0].slot in used
        assert_logits_close(got, fresh, rel=1e-5)
        run.restart(0)


def test_mtp_head_cached_equals_uncached(tmp_path):
    model = qwen35.load_model(_tiny_config_dir(tmp_path), load_format="dummy")
    assert model.mtp is not None
    ids = torch.randint(0, TEXT_IDS, (40,), generator=torch.Generator().manual_seed(2))
    nxt = torch.randint(0, TEXT_IDS, (40,), generator=torch.Generator().manual_seed(3))
    batch = ForwardBatch(query_lens=[40], context_lens=[0], positions=qwen35.model.text_positions([0], [40]))
    h = model.forward_batch(ids, batch)
    whole = model.mtp_forward(nxt, h, batch)
    assert whole.shape == (40, model.config.text.vocab_size) and torch.isfinite(whole).all()
    run = DirectRun(model, num_seqs=1, max_len=64, extra_attention_layers=1)
    outs, at = [], 0
    for n in (25, 1, 14):
        hid, b = run.forward({0: ids[at:at + n].tolist()})
        outs.append(model.mtp_forward(nxt[at:at + n], hid, b))
        at += n
    assert_logits_close(torch.cat(outs), whole, rel=1e-5)


def _tiny_config_dir(tmp_path):
    import json

    from conftest import text_config

    d = {"model_type": "qwen3_5_text", **text_config(), "mtp_num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


@pytest.mark.parametrize("kernels", [True, False])
def test_chained_decodes_equal_one_token_steps(pair, kernels):
    """A verify step (speculative decoding): n tokens as chained decodes in one forward (next to a prompt
    chunk) give each token what a decode step gives it, and the state after each one, kept in its draft slot,
    is the state after that many decode steps: keeping any number of them continues exactly."""
    from qwen35.ops import cpu_kernels

    _, model = pair
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, TEXT_IDS, (37,), generator=gen).tolist()
    more = torch.randint(0, TEXT_IDS, (6,), generator=gen).tolist()
    previous = cpu_kernels.set_enabled(kernels)
    try:
        steps = DirectRun(model, num_seqs=1, max_len=64)
        steps.forward({0: prompt})
        want = torch.cat([model.compute_logits(steps.forward({0: [t]})[0]) for t in more])
        run = DirectRun(model, num_seqs=8, max_len=64)
        for kept in (1, 2, 4):
            run.forward({0: prompt})
            hidden, _ = run.forward({0: more[:4], 1: prompt[:5]}, chained=[0])
            assert_logits_close(model.compute_logits(hidden[:4]), want[:4], rel=1e-5)
            run.keep(0, kept)
            assert run.seqs[0].token_ids == prompt + more[:kept]
            nxt = model.compute_logits(run.forward({0: [more[kept]]})[0])
            assert_logits_close(nxt, want[kept:kept + 1], rel=1e-5)
            run.restart(0)
            run.restart(1)
            run.manager.check()
    finally:
        cpu_kernels.set_enabled(previous)
