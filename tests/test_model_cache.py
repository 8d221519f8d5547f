"""The hybrid cache: any split of a prompt, then token-by-token decode, equals one forward; many
sequences in one varlen forward equal each alone; a reused state slot never leaks."""

from __future__ import annotations

import pytest
import torch

import qwen35
from conftest import TEXT_IDS, assert_logits_close, hf_logits, make_hf_model, save_hf
from qwen35.model import ForwardBatch


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    ref = make_hf_model("cg", moe=request.param == "moe")
    return ref, qwen35.load_model(save_hf(ref, tmp_path_factory.mktemp(request.param)))


def run_pieces(model, cache, seq, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Feed `ids` to `seq` in pieces of the given sizes; return the logits of every token."""
    out, at = [], 0
    for n in pieces:
        batch = ForwardBatch.for_sequences(cache, [seq], [n])
        hidden = model.forward_batch(ids[at:at + n], batch)
        seq.num_tokens += n
        at += n
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


@pytest.mark.parametrize("pieces", [[150], [1] * 20 + [130], [64, 64, 22], [63, 2, 70, 15], [100, 1, 1, 1, 47]])
def test_any_split_then_decode_equals_one_forward(pair, pieces):
    ref, model = pair
    total = sum(pieces)
    ids = torch.randint(0, TEXT_IDS, (total,), generator=torch.Generator().manual_seed(total))
    whole = hf_logits(ref, ids[None])[0]
    cache = model.new_cache(num_slots=2, max_tokens=512)
    seq = cache.new_sequence()
    assert_logits_close(run_pieces(model, cache, seq, ids, pieces), whole)


def test_mixed_varlen_batch_equals_each_alone(pair):
    """One forward holding a fresh prefill, a continued prefill chunk and two single-token decodes."""
    ref, model = pair
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, TEXT_IDS, (n,), generator=gen) for n in (90, 40, 7, 66)]
    cache = model.new_cache(num_slots=4, max_tokens=1024)
    seqs = [cache.new_sequence() for _ in prompts]
    # Warm up: sequences 1..3 already hold part of their prompt.
    done = [0, 25, 6, 65]
    for s, p, d in zip(seqs, prompts, done, strict=True):
        if d:
            run_pieces(model, cache, s, p, [d])
    new = [p[d:] for p, d in zip(prompts, done, strict=True)]  # 90, 15, 1, 1 tokens
    batch = ForwardBatch.for_sequences(cache, seqs, [len(x) for x in new])
    hidden = model.forward_batch(torch.cat(new), batch)
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
    cache = model.new_cache(num_slots=3, max_tokens=256)
    seqs = [cache.new_sequence() for _ in seqs_ids]
    for s, ids in zip(seqs, seqs_ids, strict=True):
        run_pieces(model, cache, s, ids, [len(ids) - 4])
    for step in range(4):
        tok = torch.stack([ids[len(ids) - 4 + step] for ids in seqs_ids])
        batch = ForwardBatch.for_sequences(cache, seqs, [1, 1, 1])
        logits = model.compute_logits(model.forward_batch(tok, batch))
        for s in seqs:
            s.num_tokens += 1
        for i, ids in enumerate(seqs_ids):
            n = len(ids) - 4 + step + 1
            assert_logits_close(logits[i], hf_logits(ref, ids[None, :n])[0, -1])


def test_reused_slot_starts_clean(pair):
    """A slot and blocks freed by one sequence and taken by the next hold stale data: it must not leak."""
    _, model = pair
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randint(0, TEXT_IDS, (120,), generator=gen), torch.randint(0, TEXT_IDS, (30,), generator=gen)
    cache = model.new_cache(num_slots=1, max_tokens=256)
    fresh = model.compute_logits(model.forward_batch(
        b, ForwardBatch(query_lens=[30], context_lens=[0], positions=qwen35.model.text_positions([0], [30]))))
    s1 = cache.new_sequence()
    run_pieces(model, cache, s1, a, [120])
    cache.release(s1)
    s2 = cache.new_sequence()
    assert s2.slot == 0
    for single_tokens in (False, True):
        pieces = [1] * 30 if single_tokens else [30]
        got = run_pieces(model, cache, s2, b, pieces)
        assert_logits_close(got, fresh, rel=1e-5)
        cache.release(s2)
        s2 = cache.new_sequence()


def test_mtp_head_cached_equals_uncached(tmp_path):
    model = qwen35.load_model(_tiny_config_dir(tmp_path), load_format="dummy")
    assert model.mtp is not None
    ids = torch.randint(0, TEXT_IDS, (40,), generator=torch.Generator().manual_seed(2))
    nxt = torch.randint(0, TEXT_IDS, (40,), generator=torch.Generator().manual_seed(3))
    batch = ForwardBatch(query_lens=[40], context_lens=[0], positions=qwen35.model.text_positions([0], [40]))
    h = model.forward_batch(ids, batch)
    whole = model.mtp_forward(nxt, h, batch)
    assert whole.shape == (40, model.config.text.vocab_size) and torch.isfinite(whole).all()
    cache = model.new_cache(num_slots=1, max_tokens=64)
    seq = cache.new_sequence()
    outs, at = [], 0
    for n in (25, 1, 14):
        b = ForwardBatch.for_sequences(cache, [seq], [n])
        hid = model.forward_batch(ids[at:at + n], b)
        outs.append(model.mtp_forward(nxt[at:at + n], hid, b))
        seq.num_tokens += n
        at += n
    assert_logits_close(torch.cat(outs), whole, rel=1e-5)


def _tiny_config_dir(tmp_path):
    import json

    from conftest import text_config

    d = {"model_type": "qwen3_5_text", **text_config(), "mtp_num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path
