"""Loading checkpoints: the layouts people download load exactly; each malformed one gives its error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen35
from conftest import TEXT_IDS, assert_logits_close, hf_logits, make_hf_model, save_hf, text_config
from qwen35.weights import CheckpointError

IDS = torch.randint(0, TEXT_IDS, (1, 70), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def moe_ref():
    return make_hf_model("cg", moe=True)


@pytest.fixture(scope="module")
def moe_dir(moe_ref, tmp_path_factory):
    return save_hf(moe_ref, tmp_path_factory.mktemp("moe"))


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite(folder, fn):
    """Apply fn(dict of tensors) -> dict to a single-file checkpoint."""
    path = folder / "model.safetensors"
    tensors = fn(load_file(path))
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint_loads(moe_ref, tmp_path):
    path = save_hf(moe_ref, tmp_path / "sharded", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 3
    assert_logits_close(qwen35.load_model(path)(IDS), hf_logits(moe_ref, IDS))


def test_per_expert_and_fused_experts_load_the_same(moe_ref, moe_dir, tmp_path):
    per_expert = qwen35.load_model(moe_dir)
    fused_dir = copy_ckpt(moe_dir, tmp_path / "fused")

    def fuse(t):
        out, groups = {}, {}
        for name, x in t.items():
            if ".mlp.experts." in name:
                prefix, rest = name.split(".mlp.experts.")
                e, proj, _ = rest.split(".")
                groups.setdefault(prefix, {}).setdefault(proj, {})[int(e)] = x
            else:
                out[name] = x
        for prefix, g in groups.items():
            n = len(g["gate_proj"])
            out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([g["gate_proj"][e], g["up_proj"][e]]) for e in range(n)])
            out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([g["down_proj"][e] for e in range(n)])
        return out

    rewrite(fused_dir, fuse)
    fused = qwen35.load_model(fused_dir)
    assert torch.equal(fused(IDS), per_expert(IDS))
    assert_logits_close(fused(IDS), hf_logits(moe_ref, IDS))


def test_dtype_casting(moe_dir):
    m = qwen35.load_model(moe_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.model.rotary.inv_freq.dtype == torch.float32  # tables stay fp32
    assert torch.isfinite(m(IDS).float()).all()
    with pytest.raises(ValueError, match="dtype"):
        qwen35.load_model(moe_dir, dtype="int8")


def test_vision_weights_are_loaded_not_dropped(moe_ref, moe_dir):
    m = qwen35.load_model(moe_dir)
    assert m.visual is not None
    assert torch.equal(m.visual.patch_embed.proj.weight, moe_ref.model.visual.patch_embed.proj.weight)
    assert torch.equal(m.visual.merger.linear_fc2.bias, moe_ref.model.visual.merger.linear_fc2.bias)


def test_mtp_weights_load_and_absence_is_reported(moe_dir, tmp_path):
    no_mtp = qwen35.load_model(moe_dir)
    assert no_mtp.mtp is None  # the saved config has no MTP layer, nothing to report
    # Declare an MTP layer without weights: reported, head disabled.
    d = copy_ckpt(moe_dir, tmp_path / "declared")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    m = qwen35.load_model(d)
    assert m.mtp is None and any("MTP" in line for line in m.load_report)
    # Add mtp.* tensors (taken from a dummy model of the same config): loaded and used.
    dummy = qwen35.load_model(d, load_format="dummy", seed=3)
    mtp = {f"mtp.{k}": v.clone() for k, v in dummy.mtp.state_dict().items() if "rotary" not in k}
    # per-expert names, as official checkpoints store the MTP layer's experts
    for k in [k for k in mtp if k.endswith("experts.gate_up_proj")]:
        fused = mtp.pop(k)
        inner = fused.shape[1] // 2
        for e in range(fused.shape[0]):
            mtp[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = fused[e, :inner].contiguous()
            mtp[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = fused[e, inner:].contiguous()
    for k in [k for k in mtp if k.endswith("experts.down_proj")]:
        fused = mtp.pop(k)
        for e in range(fused.shape[0]):
            mtp[k.replace("down_proj", f"{e}.down_proj.weight")] = fused[e].contiguous()
    rewrite(d, lambda t: {**t, **mtp})
    m = qwen35.load_model(d)
    assert m.mtp is not None
    assert torch.equal(m.mtp.fc.weight, dummy.mtp.fc.weight)
    assert torch.equal(m.mtp.layers[0].mlp.experts.gate_up_proj, dummy.mtp.layers[0].mlp.experts.gate_up_proj)


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshapen", "config_mismatch", "missing_expert"])
def test_malformed_checkpoints_name_each_tensor(moe_dir, tmp_path, case):
    d = copy_ckpt(moe_dir, tmp_path / case)
    if case == "missing":
        rewrite(d, lambda t: {k: v for k, v in t.items() if k != "model.language_model.layers.1.linear_attn.A_log"})
        match = r"missing tensors:\n  model.layers.1.linear_attn.A_log: expected \[4\]"
    elif case == "unexpected":
        rewrite(d, lambda t: {**t, "model.language_model.layers.0.foo.weight": torch.zeros(2)})
        match = "unexpected tensors:\n  model.language_model.layers.0.foo.weight"
    elif case == "misshapen":
        rewrite(d, lambda t: {**t, "model.language_model.norm.weight": torch.zeros(33)})
        match = r"model.language_model.norm.weight: expected \[32\], found \[33\]"
    elif case == "missing_expert":
        rewrite(d, lambda t: {k: v for k, v in t.items() if ".layers.2.mlp.experts.4." not in k})
        match = r"model.layers.2.mlp.experts.gate_up_proj \(experts \[4\]"
    else:
        cfg = json.loads((d / "config.json").read_text())
        cfg["text_config"]["linear_num_value_heads"] = 2
        (d / "config.json").write_text(json.dumps(cfg))
        match = r"wrong shape.*\n.*linear_attn.A_log: expected \[2\], found \[4\]"
    with pytest.raises(CheckpointError, match=match):
        qwen35.load_model(d)


def test_broken_index_and_missing_shard(moe_ref, tmp_path):
    path = save_hf(moe_ref, tmp_path / "sharded", max_shard_size="20KB")
    index = path / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="broken index"):
        qwen35.load_model(path)
    index.write_text(good)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard files that do not exist: {shard.name}"):
        qwen35.load_model(path)


def test_no_weights_and_bad_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text", **text_config()}))
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        qwen35.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(qwen35.ConfigError, match="not a Qwen3.5 model"):
        qwen35.load_model(tmp_path)


def test_dummy_weights_are_finite_and_seeded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe_text", **text_config(moe=True)}))
    a = qwen35.load_model(tmp_path, load_format="dummy", seed=1)
    b = qwen35.load_model(tmp_path, load_format="dummy", seed=1)
    c = qwen35.load_model(tmp_path, load_format="dummy", seed=2)
    ids = torch.randint(0, 131, (1, 300))
    la = a(ids)
    assert torch.isfinite(la).all() and la.abs().max() > 1e-3
    assert torch.equal(la, b(ids)) and not torch.equal(la, c(ids))
    # realistic decay: per-token decay factors spread from fast to slow
    gdns = [layer.linear_attn for layer in a.model.layers if layer.layer_type == "linear_attention"]
    decay = torch.cat([torch.exp(-g.A_log.exp() * torch.nn.functional.softplus(g.dt_bias)) for g in gdns])
    assert decay.max() > 0.98 and decay.min() < 0.9


def test_dummy_preset_on_meta_device_for_capacity_planning():
    m = qwen35.load_model("Qwen3.5-397B-A17B", load_format="dummy", device="meta", dtype="bfloat16")
    text = sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("mtp.", "visual.")))
    assert 396e9 < text < 397.5e9


def test_hub_id_resolves_from_local_cache_offline(moe_dir, tmp_path, monkeypatch):
    """The real hub code path, without network: a hub cache laid out as huggingface_hub writes it."""
    from huggingface_hub import constants

    snap = tmp_path / "hub" / "models--Qwen--Tiny-Test" / "snapshots" / ("a" * 40)
    shutil.copytree(moe_dir, snap)
    (tmp_path / "hub" / "models--Qwen--Tiny-Test" / "refs").mkdir()
    (tmp_path / "hub" / "models--Qwen--Tiny-Test" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    m = qwen35.load_model("Qwen/Tiny-Test")
    assert m.config.is_moe
    with pytest.raises(qwen35.ConfigError, match="not in the local hub cache"):
        qwen35.load_model("Qwen/Not-There")



def test_loading_does_not_import_torch_compile_machinery(tmp_path):
    """The meta-device model and its materialisation skip torch's reference kernels: their first use imports
    torch._dynamo and sympy, tens of MB held by the process for good."""
    import json
    import subprocess
    import sys

    from test_engine_support import write_config

    folder = write_config(tmp_path / "m")
    code = ("import json, sys, torch, qwen35\n"
            f"m = qwen35.load_model({str(folder)!r}, load_format='dummy')\n"
            "print(json.dumps(['torch._dynamo' in sys.modules, 'sympy' in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False]
