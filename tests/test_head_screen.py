"""The int8 head screen (qwen35.ops.head_screen) gives exactly the argmax of the full fp32 logits."""

from __future__ import annotations

import pytest
import torch

from qwen35.ops import cpu_kernels
from qwen35.ops.head_screen import MAX_CANDIDATES, HeadScreen, full_argmax

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="the CPU kernels could not be built")


def random_head(V: int, K: int, seed: int, std: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, K, generator=g) * std).to(torch.bfloat16)


def hidden(M: int, K: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("V,K", [(5003, 200), (6000, 1024), (3000, 77)])
def test_screen_argmax_equals_full_argmax(V, K):
    w = random_head(V, K, seed=V + K)
    screen = HeadScreen(w)
    for trial in range(12):
        M = [1, 2, 3, 5, 8, 9, 13, 16, 24, 31, 32, 7][trial]  # one kernel pass up to 32 rows (groups of 8 inside)
        x = hidden(M, K, seed=trial, scale=[1.0, 30.0, 1e-3][trial % 3])
        assert torch.equal(screen.argmax(x), full_argmax(x, w)), (V, K, M, trial)
        # it screens: a handful of rows per batch row is computed exactly, not the whole head
        assert 0 < screen.candidates_last <= 40 * M, screen.candidates_last


@pytest.mark.parametrize("V,K", [(5003, 200), (20000, 64)])
def test_fused_candidates_match_the_torch_twin(V, K):
    w = random_head(V, K, seed=V)
    screen = HeadScreen(w)
    for trial in range(10):
        x = hidden([1, 4, 8, 9, 12, 16, 17, 25, 31, 32][trial], K, seed=50 + trial, scale=[1.0, 8.0][trial % 2])
        fused, twin = screen.candidates_fused(x), screen.candidates(x)
        assert torch.equal(fused, twin), (trial, fused.tolist(), twin.tolist())


def test_screen_keeps_the_first_index_on_exact_ties():
    V, K = 4000, 256
    w = random_head(V, K, seed=1)
    x = hidden(1, K, seed=2)
    best = int(full_argmax(x, w))
    w[5] = w[best]  # an identical row below the maximum: argmax takes the lowest index
    w[3999] = w[best]
    screen = HeadScreen(w)
    assert int(screen.argmax(x)) == int(full_argmax(x, w)) == 5


def test_screen_finds_a_maximum_that_differs_by_one_ulp():
    """Rows equal but for one bf16 ulp quantise to the same int8 row; the exact logits still decide."""
    V, K = 4000, 256
    w = random_head(V, K, seed=3)
    x = hidden(1, K, seed=4)
    best = int(full_argmax(x, w))
    j = int(x[0].float().abs().argmax())  # the element with the largest |x|
    near = w[best].clone()
    bits = near.view(torch.int16)
    # one ulp away from zero on an element whose product with x is positive raises the logit
    same_sign = (near[j].float() * x[0, j].float()) > 0
    bits[j] += 1 if same_sign else -1
    w[3000] = near
    assert int(full_argmax(x, w)) == 3000
    assert torch.equal(HeadScreen(w).argmax(x), full_argmax(x, w))


def test_the_bounds_matter():
    """Without its error bounds the screen picks wrong tokens on these cases: the cases bite."""
    V, K = 6000, 128
    w = random_head(V, K, seed=5)
    screen = HeadScreen(w)
    bare = HeadScreen(w)
    bare.coef_r.zero_()
    bare.coef_x.zero_()
    wrong = 0
    for trial in range(40):
        x = hidden(4, K, seed=100 + trial)
        assert torch.equal(screen.argmax(x), full_argmax(x, w))
        wrong += int((bare.argmax(x) != full_argmax(x, w)).sum())
    assert wrong > 0


def test_bounds_hold_for_every_row():
    V, K = 3000, 300
    w = random_head(V, K, seed=6)
    screen = HeadScreen(w)
    x = hidden(3, K, seed=7, scale=5.0)
    approx, bound = screen.bounds(x)
    exact = torch.nn.functional.linear(x.double(), w.double())  # the real-number logits
    assert bool(((exact - approx.double()).abs() <= bound.double()).all())
    # and tight enough to be useful: a fraction of the spread of the logits (about sqrt(K) * the int8
    # rounding of one weight, against sqrt(K) * the weights' spread)
    assert float(bound.max()) < 0.3 * float(exact.std())


def test_degenerate_inputs_fall_back_to_the_full_logits():
    V, K = MAX_CANDIDATES + 500, 64
    w = random_head(V, K, seed=8)
    screen = HeadScreen(w)
    zero = torch.zeros(2, K, dtype=torch.bfloat16)  # every logit 0: every row a candidate
    assert screen.argmax(zero).tolist() == full_argmax(zero, w).tolist() == [0, 0]
    nan = hidden(1, K, seed=9)
    nan[0, 3] = float("nan")
    assert torch.equal(screen.argmax(nan), full_argmax(nan, w))
    big = hidden(33, K, seed=10)  # more rows than the GEMV takes
    assert torch.equal(screen.argmax(big), full_argmax(big, w))
    big = hidden(19, K, seed=10)  # more rows than one screen call takes: in groups
    assert torch.equal(screen.argmax(big), full_argmax(big, w))


def test_screen_notices_a_changed_head():
    w = random_head(1000, 64, seed=11)
    screen = HeadScreen(w)
    assert screen.is_current()
    w[0].zero_()
    assert not screen.is_current()


def test_screen_of_an_inference_tensor():
    with torch.inference_mode():
        w = random_head(2000, 64, seed=12)
    screen = HeadScreen(w)  # no version counter to read: the storage address alone tells it is current
    assert screen.is_current()
    x = hidden(2, 64, seed=13)
    assert torch.equal(screen.argmax(x), full_argmax(x, w))


def test_screen_rejects_what_it_cannot_screen():
    with pytest.raises(ValueError, match="bf16 CPU weight"):
        HeadScreen(torch.zeros(10, 8))
    assert not HeadScreen.supported(torch.zeros(10, 8))


def test_engine_greedy_tokens_are_the_same_with_and_without_the_screen(tmp_path, monkeypatch):
    from test_engine_support import engine_llm, make_model, random_prompts, write_config

    from qwen35 import SamplingParams

    model = make_model(write_config(tmp_path / "m", vocab_size=6000, tie_word_embeddings=True)).to(torch.bfloat16)
    prompts = random_prompts([1, 7, 30, 64, 5, 90, 3, 11, 40, 2], vocab=6000)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    mixed = [greedy, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0.8, top_k=40, seed=3, max_tokens=8, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, presence_penalty=1.0)]

    def run(screen: bool):
        monkeypatch.setenv("QWEN35_HEAD_SCREEN", "1" if screen else "0")
        llm = engine_llm(model, kv_cache_memory_bytes=1 << 24)
        assert llm.engine.runner.head_screen is screen
        calls = []
        if screen:
            real = model._head_screen.argmax
            monkeypatch.setattr(model._head_screen, "argmax", lambda x: calls.append(len(x)) or real(x))
        outs = [o.outputs[0] for o in llm.generate(prompts, greedy, use_tqdm=False)]  # batches of up to 10
        alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts[:3]]
        mix = [o.outputs[0] for o in llm.generate(prompts[:4], mixed, use_tqdm=False)]
        return [o.token_ids for o in outs], alone, [(o.token_ids, o.logprobs) for o in mix], calls

    on, on_alone, on_mix, calls = run(True)
    off, off_alone, off_mix, _ = run(False)
    assert on == off and on_alone == off_alone and on_mix == off_mix
    assert on_alone == on[:3]
    assert calls and min(calls) == 1  # the greedy steps went through the screen


def test_argmax_only_rows():
    """Only plain greedy rows may skip the logits."""
    from qwen35 import SamplingParams
    from qwen35.engine.sampler import SamplerRow

    def row(masked=(), **kw):
        return SamplerRow(SamplingParams(**kw), prompt_ids=[1], output_ids=[2], generator=None, masked_ids=masked)

    assert row(temperature=0).argmax_only
    assert not row(temperature=0.7).argmax_only
    assert not row(temperature=0, logprobs=0).argmax_only
    assert not row(masked=(3,), temperature=0).argmax_only
    assert not row(temperature=0, repetition_penalty=1.1).argmax_only
    assert not row(temperature=0, frequency_penalty=0.5).argmax_only
    assert not row(temperature=0, presence_penalty=0.5).argmax_only


def test_a_replaced_head_is_not_screened(tmp_path):
    """After quantize_int8 the model's logits come from the int8 head: greedy_tokens must follow it."""
    from test_engine_support import make_model, write_config

    from qwen35.ops.quant import quantize_int8

    model = make_model(write_config(tmp_path / "m", vocab_size=3000, tie_word_embeddings=True)).to(torch.bfloat16)
    assert model.enable_head_screen()
    quantize_int8(model)
    h = torch.randn(3, model.config.text.hidden_size).to(torch.bfloat16)
    assert torch.equal(model.greedy_tokens(h), model.compute_logits(h, torch.float32).argmax(-1))
    assert not model.enable_head_screen()  # a quantised head has its own int8 GEMV
