"""Official block-FP8 checkpoints: exact in fp32 against transformers, kept in 8 bits in bf16, every malformed
file refused by name; `quantization="fp8"` on BF16 checkpoints; the FP8 format's paths held to their twin."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen35
from conftest import TEXT_IDS, assert_logits_close, hf_logits, make_hf_model, save_hf
from fp8_checkpoints import dequantize_block_fp8, per_expert, write_fp8_checkpoint
from qwen35.config import ConfigError
from qwen35.ops import cpu_kernels
from qwen35.ops.quant import FP8, QuantExperts, QuantLinear
from qwen35.ops.quant.fp8 import quantize_block, scale_rows
from qwen35.weights import CheckpointError

transformers = pytest.importorskip("transformers")

# Every quantised shape a multiple of 128, as in the official sizes (transformers refuses others), with
# key heads != value heads and a MoE block.
BLOCKED = dict(hidden_size=128, head_dim=64, num_attention_heads=2, num_key_value_heads=1, linear_key_head_dim=32,
               linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
               moe_intermediate_size=128, shared_expert_intermediate_size=128)
TINY_MOE_CFG = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, shared_expert_intermediate_size=20)
IDS = torch.randint(0, TEXT_IDS, (2, 45), generator=torch.Generator().manual_seed(5))


def mtp_tensors(folder, seed=3) -> dict[str, torch.Tensor]:
    """mtp.* weights (per expert, as official checkpoints store them) from a dummy model of `folder`'s config
    with one MTP layer."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = 1
    tmp = folder.parent / f"{folder.name}-mtp-config"
    tmp.mkdir(exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg))
    dummy = qwen35.load_model(tmp, load_format="dummy", seed=seed)
    return per_expert({f"mtp.{k}": v.clone() for k, v in dummy.mtp.state_dict().items()})


@pytest.fixture(scope="module", params=["dense", "moe"])
def fp8_pair(request, tmp_path_factory):
    """(transformers model loaded from the FP8 folder in fp32, the folder), with vision and MTP weights."""
    moe = request.param == "moe"
    ref = make_hf_model("cg", moe=moe, intermediate_size=256, **BLOCKED)
    root = tmp_path_factory.mktemp(f"fp8-{request.param}")
    src = save_hf(ref, root / "bf16")
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    dst = write_fp8_checkpoint(src, root / "fp8", extra=mtp_tensors(src), shards=3)
    cls = transformers.Qwen3_5MoeForConditionalGeneration if moe else transformers.Qwen3_5ForConditionalGeneration
    hf = cls.from_pretrained(dst, dtype=torch.float32).eval()
    return hf, dst


def test_fp32_widens_exactly_and_equals_transformers(fp8_pair):
    hf, folder = fp8_pair
    ours = qwen35.load_model(folder, dtype=torch.float32)
    assert ours.quantization is None and not any(isinstance(m, QuantLinear) for m in ours.modules())
    assert_logits_close(ours(IDS), hf_logits(hf, IDS), rel=1e-4)
    # widened exactly: every converted weight equals q * scale computed from the file
    files = {}
    for f in folder.glob("*.safetensors"):
        files.update(load_file(f))
    name = "model.language_model.layers.0.linear_attn.in_proj_qkv"
    want = dequantize_block_fp8(files[name + ".weight"], files[name + ".weight_scale_inv"])
    assert torch.equal(ours.model.layers[0].linear_attn.in_proj_qkv.weight, want)
    # the MTP layer loads too (its attention and FFN converted, mtp.fc kept)
    assert ours.mtp is not None
    assert torch.equal(ours.mtp.fc.weight, files["mtp.fc.weight"].float())


def kernels_and_twin(model, ids) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Logits with the FP8 kernels and with their twin (kernels off), and how many leading positions both route
    alike: the kernels round differently from the twin, so an MoE router at a near tie may pick another expert,
    and from there on (the GDN state carries it) the two differ by a different computation, not by rounding."""
    routes: list[list[torch.Tensor]] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out: routes[-1].append(out[1].sort(-1).values))
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    previous = cpu_kernels.set_enabled(True)
    try:
        routes.append([])
        fast = model(ids).float()
        routes.append([])
        cpu_kernels.set_enabled(False)
        twin = model(ids).float()
    finally:
        cpu_kernels.set_enabled(previous)
        for h in hooks:
            h.remove()
    flips = [int((a != b).any(-1).nonzero()[0, 0]) for a, b in zip(routes[0], routes[1], strict=True)
             if (a != b).any()]
    return fast, twin, min(flips, default=ids.shape[1])


def test_bf16_keeps_8_bits_and_matches_transformers_bf16(fp8_pair):
    hf, folder = fp8_pair
    ours = qwen35.load_model(folder, dtype=torch.bfloat16)
    assert ours.quantization == "fp8"
    quant = [m for m in ours.modules() if isinstance(m, (QuantLinear, QuantExperts))]
    assert quant and all(getattr(m, f"{p}qweight").dtype == torch.float8_e4m3fn
                         for m in quant for p in (["gate_up_proj_", "down_proj_"] if isinstance(m, QuantExperts)
                                                  else [""]))
    gdn = ours.model.layers[0].linear_attn
    assert isinstance(gdn.in_proj_qkv, QuantLinear) and type(gdn.in_proj_a).__name__ == "Linear"
    assert isinstance(ours.mtp.layers[0].self_attn.q_proj, QuantLinear)
    assert type(ours.mtp.fc).__name__ == "Linear" and type(ours.lm_head).__name__ == "Linear"
    if ours.config.is_moe:
        assert isinstance(ours.model.layers[0].mlp.experts, QuantExperts)
        assert isinstance(ours.mtp.layers[0].mlp.experts, QuantExperts)
    # bytes: 1 per converted weight plus scales; nothing bf16 left of those modules
    big_bf16 = [n for n, p in ours.named_parameters() if p.dtype == torch.bfloat16 and p.dim() == 2
                and "proj" in n and "in_proj_a" not in n and "in_proj_b" not in n and "visual" not in n
                and "shared_expert_gate" not in n and "mtp.fc" not in n]
    assert not big_bf16
    ids = IDS[:1, :30]
    hf.to(torch.bfloat16)
    try:
        expected = hf_logits(hf, ids).float()
    finally:
        hf.to(torch.float32)
    fast, twin, upto = kernels_and_twin(ours, ids)
    if not ours.config.is_moe:  # transformers' bf16 MoE runs a grouped GEMM with other roundings
        # the twin (widen to bf16, then F.linear) is what transformers computes on CPU: a few bf16 ulps
        assert float((twin - expected).abs().max()) <= 1e-2 * float(expected.abs().max())
    assert upto >= 8
    scale = float(expected.abs().max())
    assert float((fast[:, :upto] - twin[:, :upto]).abs().max()) <= 0.05 * scale
    if not ours.config.is_moe:  # transformers' bf16 MoE routes with its own roundings (its own near ties)
        assert float((fast - expected).abs().max()) <= 0.05 * scale
    assert (fast.argmax(-1) == twin.argmax(-1)).float().mean() >= 0.7


def test_engine_greedy_equals_the_model(fp8_pair):
    _, folder = fp8_pair
    llm = qwen35.LLM(str(folder), skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 24,
                     max_num_batched_tokens=32)  # dtype auto: bf16, 8 bits
    assert llm.model.quantization == "fp8"
    prompts = [IDS[0, :n].tolist() for n in (3, 40)]
    outs = llm.generate(prompts, qwen35.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        seq = list(prompt)
        for _ in range(6):  # the model's own greedy continuation, one whole forward per token
            logits = llm.model(torch.tensor([seq]))[0, -1].float()
            top2 = torch.topk(logits, 2).values
            tok = int(logits.argmax())
            got = out.outputs[0].token_ids[len(seq) - len(prompt)]
            if got != tok:  # the cache path rounds differently from one forward: only at a near tie
                assert float(top2[0] - top2[1]) < 0.05 * float(logits.abs().max())
                break
            seq.append(tok)


def test_shapes_off_the_block_grid_and_f16_scales(tmp_path):
    """Tiny shapes (hidden 32, experts of 12 rows...): every tile cropped; F16 scales. fp32 equals a model whose
    checkpoint holds the widened weights; bf16 follows its twin."""
    ref = make_hf_model("cg", moe=True)
    src = save_hf(ref, tmp_path / "bf16")
    dst = write_fp8_checkpoint(src, tmp_path / "fp8", scale_dtype=torch.float16)
    tensors = load_file(dst / "model.safetensors")
    assert tensors["model.language_model.layers.0.linear_attn.in_proj_qkv.weight_scale_inv"].dtype == torch.float16
    widened = {}
    for n, t in tensors.items():
        if n.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(n[: -len(".weight")] + ".weight_scale_inv")
        widened[n] = dequantize_block_fp8(t, scale) if scale is not None else t.float()
    plain = tmp_path / "widened"
    shutil.copytree(src, plain)
    (plain / "model.safetensors").unlink()
    save_file(widened, plain / "model.safetensors", metadata={"format": "pt"})
    a = qwen35.load_model(dst, dtype=torch.float32)(IDS)
    b = qwen35.load_model(plain, dtype=torch.float32)(IDS)
    assert torch.equal(a, b)
    kept = qwen35.load_model(dst, dtype=torch.bfloat16)
    fast, twin, upto = kernels_and_twin(kept, IDS[:1])
    assert upto >= 8
    assert float((fast[:, :upto] - twin[:, :upto]).abs().max()) <= 0.05 * float(twin.abs().max())


def _variant(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors is not None:
        path = dst / "model.safetensors"
        t = load_file(path)
        edit_tensors(t)
        path.unlink()
        save_file(t, path, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def small_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-fp8")
    src = save_hf(make_hf_model("causal"), root / "bf16")
    return write_fp8_checkpoint(src, root / "fp8")


QKV = "model.layers.0.linear_attn.in_proj_qkv"


@pytest.mark.parametrize("case,match", [
    ("missing_scale", f"{QKV}.weight: F8_E4M3 weight without its scale"),
    ("misshapen_scale", f"{QKV}.weight_scale_inv: shape \\[2, 1\\], expected \\[1, 1\\]"),
    ("int_scale", f"{QKV}.weight_scale_inv: dtype I32"),
    ("listed_but_fp8", "model.layers.0.linear_attn.in_proj_a.weight: F8_E4M3, but"),
    ("scale_without_fp8", "model.layers.0.linear_attn.in_proj_z.weight_scale_inv: a scale for"),
    ("fp8_norm", "model.layers.0.input_layernorm.weight: F8_E4M3 tensor \\[32\\] is not a 2-D"),
    ("fp8_conv", "conv1d.weight: F8_E4M3 tensor"),
    ("fmt", "fmt='e5m2' is not supported"),
    ("scheme", "activation_scheme='static' is not supported"),
    ("block", "weight_block_size=\\[64, 64\\] is not supported"),
    ("no_config", "F8_E4M3 tensor, but config.json has no FP8 quantization_config"),
])
def test_malformed_fp8_checkpoints_name_the_tensor(small_fp8, tmp_path, case, match):
    def e4m3(t):
        return t.to(torch.float8_e4m3fn)

    edits = {
        "missing_scale": dict(edit_tensors=lambda t: t.pop(f"{QKV}.weight_scale_inv")),
        "misshapen_scale": dict(edit_tensors=lambda t: t.update(
            {f"{QKV}.weight_scale_inv": torch.ones(2, 1, dtype=torch.bfloat16)})),
        "int_scale": dict(edit_tensors=lambda t: t.update(
            {f"{QKV}.weight_scale_inv": torch.ones(1, 1, dtype=torch.int32)})),
        "listed_but_fp8": dict(edit_tensors=lambda t: t.update({
            "model.layers.0.linear_attn.in_proj_a.weight": e4m3(t["model.layers.0.linear_attn.in_proj_a.weight"]),
            "model.layers.0.linear_attn.in_proj_a.weight_scale_inv": torch.ones(1, 1, dtype=torch.bfloat16)})),
        "scale_without_fp8": dict(edit_tensors=lambda t: t.update({
            "model.layers.0.linear_attn.in_proj_z.weight": t["model.layers.0.linear_attn.in_proj_z.weight"].float()})),
        "fp8_norm": dict(edit_tensors=lambda t: t.update({
            "model.layers.0.input_layernorm.weight": e4m3(t["model.layers.0.input_layernorm.weight"])})),
        "fp8_conv": dict(edit_tensors=lambda t: t.update({
            "model.layers.0.linear_attn.conv1d.weight": e4m3(t["model.layers.0.linear_attn.conv1d.weight"])})),
        "fmt": dict(edit_config=lambda q: q.update(fmt="e5m2")),
        "scheme": dict(edit_config=lambda q: q.update(activation_scheme="static")),
        "block": dict(edit_config=lambda q: q.update(weight_block_size=[64, 64])),
        "no_config": dict(edit_config=lambda q: q.clear()),
    }
    d = _variant(small_fp8, tmp_path / case, **edits[case])
    if case == "no_config":
        cfg = json.loads((d / "config.json").read_text())
        del cfg["quantization_config"]
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((CheckpointError, ConfigError), match=match):
        qwen35.load_model(d, dtype=torch.bfloat16)


def test_modules_to_not_convert_matches_text_only_names(small_fp8, tmp_path):
    """The list names `model.language_model.layers...` (the multimodal layout) while a text-only checkpoint
    names `model.layers...`: still matched, so a listed module stored in FP8 is refused and the rest loads."""
    cfg = json.loads((small_fp8 / "config.json").read_text())
    listed = cfg["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.0.linear_attn.in_proj_a" in listed  # the writer lists the checkpoint's own names
    d = _variant(small_fp8, tmp_path / "cg-names", edit_config=lambda q: q.update(modules_to_not_convert=[
        m.replace("model.layers.", "model.language_model.layers.") for m in q["modules_to_not_convert"]]))
    model = qwen35.load_model(d, dtype=torch.bfloat16)
    assert model.quantization == "fp8"
    bad = _variant(d, tmp_path / "cg-names-bad", edit_tensors=lambda t: t.update({
        "model.layers.0.linear_attn.in_proj_b.weight": t["model.layers.0.linear_attn.in_proj_b.weight"].to(
            torch.float8_e4m3fn),
        "model.layers.0.linear_attn.in_proj_b.weight_scale_inv": torch.ones(1, 1, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match="in_proj_b.weight: F8_E4M3, but"):
        qwen35.load_model(bad, dtype=torch.bfloat16)


def test_int8_on_an_fp8_checkpoint_is_refused(small_fp8):
    with pytest.raises(ValueError, match="is an FP8 checkpoint: quantization='int8'"):
        qwen35.load_model(small_fp8, dtype=torch.bfloat16, quantization="int8")


# ---------------------------------------------------------------------------------------------- made at load


def test_quantize_block_round_trip_and_layout():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_block(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)
    t = {"qweight": q, "scale": scale, "srow": scale_rows([300])}
    back = FP8.dequantize(t)
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 of the value, plus subnormal steps of the tile
    tiles = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    assert ((back - w).abs() <= w.abs() / 16 + tiles * 2.0 ** -9 + 1e-12).all()
    assert float(q.float().abs().max()) == 448.0  # each tile's amax lands on e4m3's largest value


@pytest.mark.parametrize("rows", [1, 5, 8, 33, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_paths_equal_the_twin(rows, dtype):
    """`FP8.linear` (the GEMV for decode rows, the tile-widening GEMM for more) against widen-then-F.linear,
    with fused parts of 37 and 91 rows (scale tiles not 128-aligned in the fused matrix) and K = 200."""
    gen = torch.Generator().manual_seed(rows)
    parts = [FP8.quantize(torch.randn(n, 200, generator=gen) * 0.1) for n in (37, 91)]
    fused, views = FP8.concat(parts)
    assert torch.equal(FP8.dequantize(fused), torch.cat([FP8.dequantize(p) for p in parts]))
    assert all(torch.equal(FP8.dequantize(v), FP8.dequantize(p)) for v, p in zip(views, parts, strict=True))
    x = torch.randn(rows, 200, generator=gen).to(dtype)
    exact = x.double() @ FP8.dequantize(fused).double().T
    out = FP8.linear(x, fused).double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = float(exact.abs().max())
    assert float((out - exact).abs().max()) <= tol * scale
    assert float((FP8.linear_reference(x, fused).double() - exact).abs().max()) <= tol * scale


@pytest.mark.parametrize("moe", [False, True])
def test_quantization_fp8_at_load(tmp_path, moe):
    """`quantization="fp8"` on a BF16 model: the modules of the official list converted, each tile as the
    official converter makes it, close to full precision, and the engine runs on it."""
    from test_engine_support import write_config

    folder = write_config(tmp_path / "cfg", **({"model_type": "qwen3_5_moe_text", **TINY_MOE_CFG} if moe else {}))
    full = qwen35.load_model(folder, load_format="dummy", dtype=torch.bfloat16)
    fp8 = qwen35.load_model(folder, load_format="dummy", dtype=torch.bfloat16, quantization="fp8")
    assert fp8.quantization == "fp8"
    gdn, gdn_full = fp8.model.layers[0].linear_attn, full.model.layers[0].linear_attn
    assert isinstance(gdn.in_proj_qkv, QuantLinear) and isinstance(gdn.out_proj, QuantLinear)
    assert type(gdn.in_proj_a).__name__ == "Linear" and fp8.model.embed_tokens.weight.dtype == torch.bfloat16
    q, scale = quantize_block(gdn_full.out_proj.weight)
    assert torch.equal(gdn.out_proj.qweight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(gdn.out_proj.scale, scale)
    if moe:
        assert isinstance(fp8.model.layers[0].mlp.experts, QuantExperts)
    ids = IDS[:1, :20]
    a, b = full(ids).float(), fp8(ids).float()
    assert float((a - b).abs().max()) <= 0.1 * float(a.abs().max())
    llm = qwen35.LLM(fp8, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22)
    out = llm.generate([ids[0].tolist()], qwen35.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_cli_generate_and_info_with_fp8(tmp_path, small_fp8, capsys):
    from test_engine_support import write_config

    from qwen35.cli import main

    tiny = write_config(tmp_path / "tiny", vocab_size=248320)
    assert main(["generate", str(tiny), "Hello", "--load-format", "dummy", "--quantization", "fp8",
                 "--max-tokens", "3", "--temperature", "0", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["info", "Qwen3.5-397B-A17B", "--quantization", "fp8", "--context", "4096"]) == 0
    text = capsys.readouterr().out
    assert "weights (fp8)" in text
    assert main(["info", str(small_fp8), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization"] == "fp8" and info["weight_bytes"] == info["weight_bytes_fp8"]


def test_fused_experts_layout_equals_per_expert(tmp_path):
    """The FP8 experts hold gate and up on their own tile grids (as stored): widening the kept model's experts
    gives exactly the per-expert tensors of the file."""
    ref = make_hf_model("causal", moe=True)
    src = save_hf(ref, tmp_path / "bf16")
    dst = write_fp8_checkpoint(src, tmp_path / "fp8")
    tensors = load_file(dst / "model.safetensors")
    model = qwen35.load_model(dst, dtype=torch.bfloat16)
    experts = model.model.layers[1].mlp.experts
    gate_up = experts.dequantize("gate_up_proj")
    inner = gate_up.shape[1] // 2
    for e in (0, 5):
        for j, proj in enumerate(("gate_proj", "up_proj")):
            name = f"model.layers.1.mlp.experts.{e}.{proj}"
            want = dequantize_block_fp8(tensors[name + ".weight"], tensors[name + ".weight_scale_inv"])
            assert torch.equal(gate_up[e, j * inner:(j + 1) * inner], want)


def test_a_quantised_head_is_kept_in_8_bits(tmp_path):
    """A checkpoint that also converts lm_head (not in its modules_to_not_convert): the head is an FP8 layer;
    fp32 widens it exactly, bf16 runs it through the FP8 kernels (greedy through the full logits)."""
    ref = make_hf_model("causal")
    src = save_hf(ref, tmp_path / "bf16")
    dst = write_fp8_checkpoint(src, tmp_path / "fp8")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"].remove("lm_head")
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(dst / "model.safetensors")
    tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"] = quantize_block(tensors["lm_head.weight"])
    (dst / "model.safetensors").unlink()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    exact = qwen35.load_model(dst, dtype=torch.float32)
    assert torch.equal(exact.lm_head.weight, dequantize_block_fp8(tensors["lm_head.weight"],
                                                                  tensors["lm_head.weight_scale_inv"]))
    kept = qwen35.load_model(dst, dtype=torch.bfloat16)
    assert isinstance(kept.lm_head, QuantLinear) and not kept.enable_head_screen()
    hidden = torch.randn(3, kept.config.text.hidden_size, generator=torch.Generator().manual_seed(0))
    want = hidden.double() @ exact.lm_head.weight.double().T
    got = kept.compute_logits(hidden.bfloat16(), torch.float32).double()
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())
    assert torch.equal(kept.greedy_tokens(hidden.bfloat16()), got.argmax(-1))


def test_mtp_speculative_decoding_on_an_fp8_checkpoint(fp8_pair):
    """The checkpoint's MTP layer in FP8 drafts; the tokens equal MTP off (bf16, kept in 8 bits)."""
    from test_speculative import oracle

    _, folder = fp8_pair
    prompts = [IDS[0, :9].tolist(), IDS[0, :30].tolist()]
    sp = qwen35.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    off = qwen35.LLM(str(folder), dtype="bfloat16", kv_cache_memory_bytes=1 << 25, skip_tokenizer_init=True)
    assert off.model.mtp is not None
    ref = [o.outputs[0].token_ids for o in off.generate(prompts, sp, use_tqdm=False)]
    on = oracle(qwen35.LLM(off.model, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 25,
                           speculative_config={"method": "mtp", "num_speculative_tokens": 3}),
                {tuple(p): r for p, r in zip(prompts, ref, strict=True)}, 0.7)
    assert [o.outputs[0].token_ids for o in on.generate(prompts, sp, use_tqdm=False)] == ref
    assert on.speculative_stats()["num_accepted_tokens"] > 0
