"""The benchmark checkpoints: random weights in the official safetensors layout, saved by transformers, so that
every engine loads the same numbers; plus their GGUF conversions for llama.cpp.

Two shapes (MTP off, text only):
  * ``0.8b``: the verbatim Qwen3.5-0.8B text config (tied head, 24 layers, 18 GDN + 6 full attention);
  * ``moe``: the Qwen3.5-35B-A3B text config cut to 4 layers (3 GDN + 1 full attention), untied head.
``<name>-twin``: the same shape with every layer full attention (what a pure-transformer design costs); only our
engine runs it (no need for GGUF).

Everything is cached under the bench cache folder (``--cache-dir``, ``$QWEN35_BENCH_CACHE``, default
``~/.cache/qwen35-bench``); a checkpoint is made once and reused while its recipe is unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE_08B = REPO.parent / "shared" / "reference" / "Qwen3.5-0.8B" / "config.json"
RECIPE_VERSION = 1  # bump to remake every cached checkpoint
LLAMA_SDIST_VERSION = "0.3.36"


def default_cache_dir() -> Path:
    env = os.environ.get("QWEN35_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qwen35-bench"


def _rope() -> dict:
    return {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10], "mrope_interleaved": True}


def text_config_dict(name: str) -> dict:
    """The transformers text config (``qwen3_5_text`` / ``qwen3_5_moe_text``) of a benchmark checkpoint."""
    base, _, suffix = name.partition("-")
    if base == "0.8b":
        if REFERENCE_08B.exists():
            d = copy.deepcopy(json.loads(REFERENCE_08B.read_text())["text_config"])
            d["tie_word_embeddings"] = json.loads(REFERENCE_08B.read_text()).get("tie_word_embeddings", True)
        else:  # the same numbers, for a checkout without ../shared
            from qwen35.config import PRESET_DICTS

            d = copy.deepcopy(PRESET_DICTS["Qwen3.5-0.8B"]["text_config"])
            d.update(intermediate_size=3584, layer_types=None)
        d["model_type"] = "qwen3_5_text"
    elif base == "moe":
        from qwen35.config import PRESET_DICTS

        d = copy.deepcopy(PRESET_DICTS["Qwen3.5-35B-A3B"]["text_config"])
        d["num_hidden_layers"] = 4
        d["model_type"] = "qwen3_5_moe_text"
    elif base == "tiny":  # for the harness's own smoke test
        d = dict(model_type="qwen3_5_text", vocab_size=512, hidden_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_conv_kernel_dim=4, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown benchmark model {name!r} (expected 0.8b, moe, tiny, optionally with -twin)")
    d["rope_parameters"] = _rope() if base != "tiny" else {**_rope(), "mrope_section": [2, 1, 1]}
    d["mtp_num_hidden_layers"] = 0
    d["max_position_embeddings"] = 262144
    d.pop("dtype", None)
    n = d["num_hidden_layers"]
    d["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    if suffix == "twin":
        d["layer_types"] = ["full_attention"] * n
    elif suffix:
        raise ValueError(f"unknown benchmark model {name!r}")
    return d


def _recipe_hash(name: str) -> str:
    blob = json.dumps({"v": RECIPE_VERSION, "cfg": text_config_dict(name)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint_dir(cache: Path, name: str) -> Path:
    return cache / f"{name}-{_recipe_hash(name)}"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def make_checkpoint(cache: Path, name: str, seed: int = 0) -> Path:
    """Make (once) and return the safetensors checkpoint folder of a benchmark model."""
    folder = checkpoint_dir(cache, name)
    if (folder / "DONE").exists():
        return folder
    import torch
    import transformers as tf

    d = text_config_dict(name)
    moe = d["model_type"] == "qwen3_5_moe_text"
    cfg_cls = tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig
    cls = tf.Qwen3_5MoeForCausalLM if moe else tf.Qwen3_5ForCausalLM
    kw = {k: v for k, v in d.items() if k != "model_type"}
    cfg = cfg_cls(**kw)
    _log(f"making checkpoint {name} in {folder} (random weights, seed {seed}) ...")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the MoE checkpoint would need ~17 GB in fp32
    try:
        model = cls(cfg).eval()  # transformers' own init: normal(0, 0.02) for every linear/embedding/expert
    finally:
        torch.set_default_dtype(old)
    _realistic_init(model, seed)
    model = model.to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="2GB")
    del model
    write_tokenizer(tmp)
    (tmp / "bench_recipe.json").write_text(json.dumps({"name": name, "seed": seed, "recipe": RECIPE_VERSION,
                                                       "text_config": d}, indent=1))
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    _log(f"checkpoint {name} made in {time.perf_counter() - t0:.0f} s")
    return folder


def make_fp8_checkpoint(cache: Path, name: str) -> Path:
    """The benchmark checkpoint in the official block-FP8 layout (once): every linear weight that the official
    `-FP8` releases convert becomes F8_E4M3 with an F32 `weight_scale_inv` per 128x128 tile (amax / 448), experts
    per expert; the rest (embeddings, head, GDN conv/a/b, routers, shared-expert gates) stays BF16."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwen35.ops.quant.fp8 import quantize_block

    src = make_checkpoint(cache, name)
    folder = src.with_name(src.name + "-fp8")
    if (folder / "DONE").exists():
        return folder
    kept = ("embed_tokens", "lm_head", "linear_attn.conv1d", "linear_attn.in_proj_a", "linear_attn.in_proj_b",
            "mlp.gate", "mlp.shared_expert_gate", "mtp.fc")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _log(f"making the FP8 checkpoint of {name} in {folder} ...")
    t0 = time.perf_counter()
    weight_map, not_converted = {}, set()
    for i, shard in enumerate(sorted(src.glob("*.safetensors"))):
        out = {}
        with safe_open(shard, "pt") as f:
            for n in f.keys():
                t = f.get_tensor(n)
                if n.endswith(("experts.gate_up_proj", "experts.down_proj")):  # fused 3-D -> per expert
                    base, proj = n.rsplit(".", 1)
                    mats = {}
                    for e in range(t.shape[0]):
                        if proj == "down_proj":
                            mats[f"{base}.{e}.down_proj"] = t[e]
                        else:
                            half = t.shape[1] // 2
                            mats[f"{base}.{e}.gate_proj"], mats[f"{base}.{e}.up_proj"] = t[e, :half], t[e, half:]
                    for mod, w in mats.items():
                        q, scale = quantize_block(w)
                        out[mod + ".weight"], out[mod + ".weight_scale_inv"] = q, scale
                    continue
                mod = n[: -len(".weight")] if n.endswith(".weight") else None
                if mod is None or t.dim() != 2 or "norm" in n:
                    out[n] = t
                elif mod.endswith(kept):
                    out[n] = t
                    not_converted.add(mod)
                else:
                    q, scale = quantize_block(t)
                    out[n], out[mod + ".weight_scale_inv"] = q, scale
        fname = f"model-{i + 1:05d}.safetensors"
        save_file(out, tmp / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in out})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128], "modules_to_not_convert": sorted(not_converted)}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    _log(f"FP8 checkpoint of {name} made in {time.perf_counter() - t0:.0f} s")
    del torch
    return folder


def _realistic_init(model, seed: int) -> None:
    """On top of transformers' init: GDN decay spread as in trained models (per-head A in [1, 16], dt log-uniform
    in [1e-3, 1e-1]), and a short conv with taps of order one (std 1/sqrt(kernel))."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "A_log") and hasattr(mod, "dt_bias"):
                n = mod.A_log.numel()
                mod.A_log.copy_(torch.empty(n).uniform_(1.0, 16.0, generator=gen).log())
                dt = torch.empty(n).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
                mod.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
                conv = mod.conv1d.weight
                conv.copy_(torch.randn(conv.shape, generator=gen) / math.sqrt(conv.shape[-1]))


def write_tokenizer(folder: Path) -> None:
    """The Qwen3.5 tokenizer (the built-in vocabulary of qwen35) as tokenizer.json: the GGUF converter needs one."""
    from qwen35 import load_tokenizer

    tok = load_tokenizer(None)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 262144}, indent=1))


# ------------------------------------------------------------------------------------------------ GGUF
def find_converter(explicit: str | None = None) -> Path | None:
    """The folder holding convert_hf_to_gguf.py and gguf-py (llama.cpp as vendored in the llama-cpp-python sdist)."""
    cands = []
    if explicit:
        cands.append(Path(explicit).expanduser())
    if os.environ.get("LLAMA_CPP_CONVERTER"):
        cands.append(Path(os.environ["LLAMA_CPP_CONVERTER"]).expanduser())
    sd = f"llama_cpp_python-{LLAMA_SDIST_VERSION}"
    cands += [Path("/tmp/llama_sdist") / sd / "vendor" / "llama.cpp",
              default_cache_dir() / "llama_sdist" / sd / "vendor" / "llama.cpp"]
    for c in cands:
        if c.name == "convert_hf_to_gguf.py":
            c = c.parent
        if (c / "convert_hf_to_gguf.py").exists() and (c / "gguf-py").is_dir():
            return c
    return None


CONVERTER_HELP = (
    "the GGUF converter was not found: get the llama-cpp-python sdist and point --converter at its "
    "vendor/llama.cpp folder:\n  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llama_sdist"
    f"\n  tar xzf /tmp/llama_sdist/llama_cpp_python-{LLAMA_SDIST_VERSION}.tar.gz -C /tmp/llama_sdist")


# llama.cpp's quantize mixes (llama_ftype values of llama.h), made from the bf16 conversion
LLAMA_QUANTIZE = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def make_gguf(cache: Path, name: str, outtype: str = "bf16", converter: str | None = None) -> Path:
    """Convert a benchmark checkpoint to GGUF (once): ``convert_hf_to_gguf.py --outtype {bf16,q8_0} --no-mtp``;
    the K-quant mixes (``q4_k_m``, ``q5_k_m``, ``q6_k``) by llama.cpp's own quantize (llama-cpp-python's
    ``llama_model_quantize``, as ``llama-quantize`` does) from the bf16 file."""
    folder = make_checkpoint(cache, name)
    out = folder / f"model-{outtype}.gguf"
    if out.exists():
        return out
    if outtype in LLAMA_QUANTIZE:
        src = make_gguf(cache, name, "bf16", converter)
        tmp = out.with_suffix(".gguf.tmp")
        code = ("import llama_cpp as l, sys\n"
                "p = l.llama_model_quantize_default_params()\n"
                f"p.ftype = {LLAMA_QUANTIZE[outtype]}\np.nthread = 2\n"
                f"sys.exit(l.llama_model_quantize({str(src).encode()!r}, {str(tmp).encode()!r}, p))")
        _log(f"quantizing {name} to {outtype} with llama.cpp")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp quantize to {outtype} failed ({r.returncode}):\n{r.stdout[-4000:]}")
        tmp.rename(out)
        _log(f"GGUF {outtype} of {name} made in {time.perf_counter() - t0:.0f} s "
             f"({out.stat().st_size / 2**30:.2f} GiB)")
        return out
    conv = find_converter(converter)
    if conv is None:
        raise FileNotFoundError(CONVERTER_HELP)
    tmp = out.with_suffix(".gguf.tmp")
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype, "--no-mtp",
           "--outfile", str(tmp)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(conv / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    _log(f"converting {name} to GGUF {outtype}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed ({r.returncode}):\n{r.stdout[-4000:]}")
    tmp.rename(out)
    _log(f"GGUF {outtype} of {name} made in {time.perf_counter() - t0:.0f} s ({out.stat().st_size / 2**30:.2f} GiB)")
    return out
