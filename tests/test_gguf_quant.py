"""GGUF files kept quantized (Q8_0, Q4_K, Q5_K, Q6_K in their blocks, below float32) against the same files widened
exactly: the reorders done on whole rows of bytes (and the ssm_out column reorder by gathering the input) give
the same weights; the model's logits agree; the block twins equal gguf's own dequantizer bit for bit.

Files are written by tests/gguf_files.py (gguf's writer, the converter's layout), in a mix of types like
llama.cpp's Q4_K_M (Q4_K, Q5_K, Q6_K, Q8_0, and a Q4_0 tensor that has no kernel and is widened)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from gguf_files import dummy_model, random_blocks, write_gguf

import qwen35
from conftest import assert_logits_close
from qwen35.ops import cpu_kernels
from qwen35.ops.quant import QuantExperts, QuantLinear
from qwen35.ops.quant.base import QuantEmbedding
from qwen35.ops.quant.gguf import KEPT_TYPES
from qwen35.weights import CheckpointError
from qwen35.weights.gguf import load_gguf

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
IDS = torch.randint(0, 500, (1, 37), generator=torch.Generator().manual_seed(1))


def mix(name: str, shape: tuple[int, ...]) -> int:
    """A Q4_K_M-like mix: K-quants where the row length allows, Q8_0 elsewhere, one Q4_0 tensor, routers in F32."""
    if name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")):
        return T.F32
    k = shape[-1]
    if k % 256:
        return T.Q8_0
    if name == "blk.0.ffn_up_shexp.weight" or name == "blk.0.ffn_up.weight":
        return T.Q4_0  # no kernel: widened
    if name.endswith(("ffn_down.weight", "ffn_down_exps.weight", "ssm_out.weight", "output.weight", "attn_v.weight")):
        return T.Q6_K if not name.startswith("blk.1.") else T.Q5_K  # llama.cpp varies these by layer
    if name.endswith(("attn_gate.weight", "token_embd.weight")):
        return T.Q5_K
    if name.endswith(("ssm_alpha.weight", "ssm_beta.weight", "attn_k.weight", "ffn_gate_shexp.weight")):
        return T.Q8_0
    return T.Q4_K


@pytest.fixture(scope="module", params=["dense-tied", "moe"])
def mixed(request, tmp_path_factory):
    moe = request.param == "moe"
    folder = tmp_path_factory.mktemp(f"gguf-quant-{request.param}")
    model = dummy_model(folder, moe=moe, tied=not moe)
    path = write_gguf(model, folder / "model-mix.gguf", mix, chat_template=TEMPLATE, as_quantize=True)
    return path, qwen35.load_model(path, dtype=torch.float32)


def test_an_f32_gguf_gives_back_every_weight_mtp_included(tmp_path):
    """Written in the converter's layout (transforms applied, value heads tiled, MTP as block n_layer with its
    nextn tensors) and read back in fp32: every parameter equals the model's, the MTP head too."""
    model = dummy_model(tmp_path, moe=True, tied=False)
    path = write_gguf(model, tmp_path / "f32.gguf", lambda name, shape: T.F32)
    back = qwen35.load_model(path, dtype=torch.float32)
    assert back.mtp is not None and back.config.text.mtp_num_hidden_layers == 1
    ours = dict(back.state_dict())
    for name, p in model.state_dict().items():
        torch.testing.assert_close(ours[name], p, rtol=1e-6, atol=1e-7, msg=name)  # A_log: log(-(-exp)) in fp32
    assert_logits_close(back(IDS), model(IDS), rel=1e-5)


WIDENED_TYPES = ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "MXFP4")


def test_types_without_kernels_are_widened_to_gguf_values(tmp_path):
    """Every other type the issue lists loads, widened per tensor to exactly gguf.quants.dequantize's values
    (F16 / BF16 exactly; the rest through gguf's own dequantizer), kept types beside them stay in blocks."""
    from qwen35.weights.gguf_file import GGUFFile

    model = dummy_model(tmp_path, moe=False, tied=False)
    names = itertools.cycle(WIDENED_TYPES)
    chosen: dict[str, str] = {}

    def type_of(name: str, shape) -> int:
        if not name.startswith("blk.") or name.endswith(("norm.weight", "ssm_conv1d.weight")) or shape[-1] % 256:
            return T.F32 if len(shape) < 2 or shape[-1] % 256 else T.Q4_K
        chosen[name] = next(names)
        return T[chosen[name]]

    path = write_gguf(model, tmp_path / "types.gguf", type_of)
    assert set(chosen.values()) == set(WIDENED_TYPES)
    f32 = qwen35.load_model(path, dtype=torch.float32)
    bf16 = qwen35.load_model(path, dtype=torch.bfloat16)
    assert any("without kernels, widened" in line for line in bf16.load_report)
    params = dict(f32.named_parameters())
    tensors = {t.name: t for t in GGUFFile(path).tensors}
    for gname, kind in chosen.items():
        if gname.endswith(("attn_qkv.weight", "attn_gate.weight", "ssm_alpha.weight", "ssm_beta.weight",
                           "ssm_out.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight")):
            continue  # reordered or split on the way: covered by the kept-vs-widened tests
        if int(gname.split(".")[1]) >= model.config.text.num_hidden_layers:
            continue  # the MTP block
        x = tensors[gname]
        ref = torch.from_numpy(gguf.quants.dequantize(x.read().reshape(x.shape[0], -1), T[kind]).copy())
        ours = next(p for n, p in params.items() if n.startswith(f"model.layers.{gname.split('.')[1]}.")
                    and n.endswith(_OURS[gname.split(".", 2)[2]]))
        assert torch.equal(ours, ref.float()), (gname, kind)
    assert torch.isfinite(bf16(IDS)).all()


_OURS = {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
         "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
         "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
         "ffn_down.weight": "mlp.down_proj.weight"}


def _random_rows(fmt, rows: int, k: int, rng) -> np.ndarray:
    if fmt.name == "q8_0":
        return gguf.quants.quantize(rng.standard_normal((rows, k)).astype(np.float32), T.Q8_0)
    return random_blocks(fmt.ggml_type, (rows, k), rng)


@pytest.mark.parametrize("fmt", list(KEPT_TYPES.values()), ids=lambda f: f.name)
def test_block_twins_equal_gguf_dequantize_bit_for_bit(fmt):
    rng = np.random.default_rng(0)
    for rows, blocks in ((1, 1), (7, 3), (64, 5)):
        data = _random_rows(fmt, rows, blocks * fmt.block_elems, rng)
        data[0, :4] = rng.integers(0, 256, 4, dtype=np.uint8) if fmt.name != "q6_k" else data[0, :4]
        ref = gguf.quants.dequantize(data, T(fmt.ggml_type))
        ours = fmt.dequantize({"qweight": torch.from_numpy(data)}).numpy()
        finite = np.isfinite(ref)
        assert np.array_equal(np.isfinite(ours), finite)
        assert np.array_equal(ours[finite].view(np.uint32), ref[finite].view(np.uint32))


def test_kept_modules_hold_the_widened_weights(mixed):
    """Every kept module widened by its twin equals the file widened at load (float32), bit for bit: the byte-row
    value-head reorders and the gathered ssm_out inputs put every weight where the widened path puts it."""
    path, exact = mixed
    kept = qwen35.load_model(path, dtype=torch.bfloat16)
    assert kept.quantization == "gguf"
    assert any("kept quantized" in line for line in kept.load_report)
    assert any("widened" in line and "ffn_up" in line for line in kept.load_report)  # the Q4_0 tensor named
    ref = dict(exact.named_parameters())
    seen = {"linear": 0, "experts": 0, "reordered": 0}
    for name, m in kept.named_modules():
        if isinstance(m, QuantLinear) and name != "lm_head":
            assert torch.equal(m.dequantize(torch.float32), ref[f"{name}.weight"]), name
            seen["linear"] += 1
            seen["reordered"] += m.in_order is not None
        elif isinstance(m, QuantExperts):
            for proj in ("gate_up_proj", "down_proj"):
                assert torch.equal(m.dequantize(proj, torch.float32), ref[f"{name}.{proj}"]), (name, proj)
            seen["experts"] += 1
    assert seen["linear"] > 10 and seen["reordered"] == 3  # the three GDN layers' out_proj
    assert seen["experts"] == (5 if kept.config.text.is_moe else 0)  # four layers and the MTP layer's
    emb = kept.model.embed_tokens
    assert isinstance(emb, QuantEmbedding)
    ids = torch.tensor([0, 5, 511, 5])
    torch.testing.assert_close(emb(ids), exact.model.embed_tokens(ids).to(torch.bfloat16), rtol=0, atol=0)
    if kept.config.text.tie_word_embeddings:  # the tied head reads the embedding's blocks, no copy
        assert kept.lm_head.qweight.data_ptr() == emb.qweight.data_ptr()
    assert kept.mtp is not None and isinstance(kept.mtp.fc, QuantLinear)


def test_kept_model_kernels_equal_its_twins_and_stay_near_the_exact_model(mixed):
    """The kept model with the compiled kernels and with the twins (exact fp32 weights, fp32 sums, one rounding):
    the same up to summation order. Against the file widened to fp32 only bf16 activations differ (dense only: the
    MoE's routing flips under them)."""
    path, exact = mixed
    kept = qwen35.load_model(path, dtype=torch.bfloat16)
    a = kept(IDS)
    previous = cpu_kernels.set_enabled(False)
    try:
        b = kept(IDS)
    finally:
        cpu_kernels.set_enabled(previous)
    # per position: sums in another order may round an activation the other way and flip a MoE routing choice at
    # a position (a large change there); every other position agrees to bf16 rounding
    moe = kept.config.text.is_moe
    k = cpu_kernels.build()
    bf16_tiles = k is not None and k.gguf_prefill_bf16()  # hosts with bf16 dots: prompt tiles rounded to bf16
    tol = 4e-2 if bf16_tiles else 2e-2
    per_position = (a.float() - b.float()).abs().amax(-1)[0] / max(1.0, float(b.abs().max()))
    assert float((per_position <= tol).float().mean()) >= (0.9 if moe else 1.0), per_position.tolist()
    assert float((a[0].argmax(-1) == b[0].argmax(-1)).float().mean()) >= 0.9
    if not moe:
        assert_logits_close(a, exact(IDS), rel=8e-2 if bf16_tiles else 5e-2)
    widened = load_gguf(path, torch.bfloat16, keep_quantized=False)  # the file's values rounded to bf16
    assert not any(isinstance(m, QuantLinear) for m in widened.modules())
    if not moe:
        assert_logits_close(widened(IDS), exact(IDS), rel=0.15)


def test_engine_runs_a_kept_gguf(mixed):
    """dtype "auto" keeps the blocks; each greedy token is the model's own argmax after the engine's prefix (or
    ties it within bf16 rounding: the engine decodes through the GEMV, the whole-sequence forward through the tile
    GEMM, whose sums differ in order)."""
    path, _ = mixed
    llm = qwen35.LLM(str(path), kv_cache_memory_bytes=1 << 24, skip_tokenizer_init=True)
    assert llm.model.quantization == "gguf" and llm.model.dtype == torch.bfloat16
    prompt = IDS[0, :20].tolist()
    out = llm.generate([{"prompt_token_ids": prompt}], qwen35.SamplingParams(temperature=0, max_tokens=4,
                                                                           ignore_eos=True))
    got = out[0].outputs[0].token_ids
    assert len(got) == 4
    for i, tok in enumerate(got):
        logits = llm.model(torch.tensor([prompt + got[:i]]))[0, -1].float()
        assert float(logits.max() - logits[tok]) <= 2e-2 * max(1.0, float(logits.abs().max())), (i, tok)
    with pytest.raises(ValueError, match="separate mmproj-"):  # a GGUF is text only: say what images need
        llm.model.encode_vision(torch.zeros(4, 8), torch.tensor([[1, 2, 2]]))


def test_a_gguf_without_tokens_takes_the_builtin_vocabulary_and_its_own_chat_template(mixed):
    from qwen35.weights.gguf import gguf_tokenizer

    path, _ = mixed
    tok = gguf_tokenizer(path)
    assert tok.chat_template == TEMPLATE
    assert tok.encode("Hello world") == qwen35.load_tokenizer(None).encode("Hello world")


def test_quantization_option_is_refused_on_a_gguf(mixed):
    path, _ = mixed
    with pytest.raises(ValueError, match="is a GGUF file: quantization='int8'"):
        qwen35.load_model(path, quantization="int8")


def test_bad_tensor_data_is_named(mixed, tmp_path):
    path, _ = mixed
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])  # header intact, the last tensor's bytes cut short
    with pytest.raises(CheckpointError, match=r"cut.gguf: tensor .* runs past the end of the file"):
        qwen35.load_model(cut)
    # an unknown type id in the tensor directory
    from qwen35.weights.gguf_file import GGUFFile

    f = GGUFFile(path)
    first = f.tensors[0]
    name = first.name.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    nd = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * nd
    odd = tmp_path / "odd.gguf"
    odd.write_bytes(data[:type_at] + (77).to_bytes(4, "little") + data[type_at + 4:])
    with pytest.raises(CheckpointError, match=f"odd.gguf: tensor {first.name} has GGUF type id 77"):
        qwen35.load_model(odd)


def test_info_gives_the_weights_as_loaded(mixed, capsys):
    """`qwen35 info x.gguf`: the weight bytes it reports are what the kept model holds (blocks as stored, the rest
    in bf16), MTP included."""
    from qwen35.cli import main
    from qwen35.weights.gguf import gguf_loaded_bytes

    path, _ = mixed
    assert main(["info", str(path)]) == 0
    expected = gguf_loaded_bytes(path)
    rows = {k.strip(): v.strip() for k, v in (line.rsplit("  ", 1) for line in capsys.readouterr().out.splitlines()
                                              if "  " in line)}
    assert rows["weights (GGUF as loaded in bf16)"] == f"{expected / 2**30:,.2f} GiB"
    kept = qwen35.load_model(path, dtype=torch.bfloat16)
    seen, held = set(), 0
    for name, t in [*kept.named_parameters(), *kept.named_buffers()]:
        if t.untyped_storage().data_ptr() in seen or "rotary" in name or name.endswith("in_order"):
            continue
        seen.add(t.untyped_storage().data_ptr())
        held += t.untyped_storage().nbytes()
    assert abs(held - expected) <= 0.01 * expected, (held, expected)


def test_mtp_speculative_decoding_on_a_quantized_gguf(mixed):
    """The GGUF's own MTP layer (kept in its blocks) drafts; the tokens equal MTP off (bf16, blocks kept)."""
    from test_speculative import oracle

    path, _ = mixed
    prompts = [[5, 17, 99, 3, 250, 31], list(range(40, 110))]
    sp = qwen35.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    off = qwen35.LLM(str(path), dtype="bfloat16", kv_cache_memory_bytes=1 << 25, skip_tokenizer_init=True)
    ref = [o.outputs[0].token_ids for o in off.generate(prompts, sp, use_tqdm=False)]
    on = qwen35.LLM(off.model, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 25,
                    speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert [o.outputs[0].token_ids for o in on.generate(prompts, sp, use_tqdm=False)] == ref
    oracle(on, {tuple(p): r for p, r in zip(prompts, ref, strict=True)}, 0.7)
    assert [o.outputs[0].token_ids for o in on.generate(prompts, sp, use_tqdm=False)] == ref
    assert on.speculative_stats()["num_accepted_tokens"] > 0
