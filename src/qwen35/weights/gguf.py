"""GGUF files (llama.cpp) of Qwen3.5: metadata -> ModelConfig, tensors back to our layout (read with `gguf`).

The converter (`convert_hf_to_gguf.py`, `conversion/qwen.py` of llama.cpp, architectures `qwen35` / `qwen35moe`)
renames every tensor and transforms some; this module undoes each transform:
  * zero-centred norm weights are stored as w + 1 (every `*norm.weight` but the GDN's gated `ssm_norm`);
  * `A_log` is stored as `ssm_a` = -exp(A_log); `dt_bias` as `ssm_dt.bias`; conv1d [C, 1, 4] squeezed to [C, 4];
  * with key heads != value heads, the value heads are tiled [k0v0, k1v0, k0v1, ...] instead of grouped by key
    head [k0v0, k0v1, k1v0, ...]: in the v rows of `attn_qkv`, the rows of `attn_gate`, `ssm_alpha`,
    `ssm_beta`, `ssm_a`, `ssm_dt`, the v channels of `ssm_conv1d` and the input columns of `ssm_out`;
  * routed experts are stored as three [E, ...] tensors (gate and up apart).
This first step widens every tensor to the model dtype at load (`gguf.quants.dequantize`): exact, not yet kept
quantized (the issue's kernels are the next step). The MTP layer (`blk.{n}.nextn.*`) is not loaded yet.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from qwen35.config import ConfigError, ModelConfig
from qwen35.weights.safetensors_io import CheckpointError

log = logging.getLogger("qwen35")

ARCHS = {"qwen35": "qwen3_5_text", "qwen35moe": "qwen3_5_moe_text"}
_SPLIT = re.compile(r"^(?P<base>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")

# GGUF block tensor -> our parameter (inside model.layers.{i}.)
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight", "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight", "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight", "ssm_a": "linear_attn.A_log",
    "ssm_dt.bias": "linear_attn.dt_bias", "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight", "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_up_proj", "ffn_up_exps.weight": "mlp.experts.gate_up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_PLUS_ONE = ("attn_norm.weight", "post_attention_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight",
             "output_norm.weight")


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if p.suffix == ".gguf":
        return True
    if p.is_file():
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    return False


def gguf_shards(path: str | Path) -> list[Path]:
    """The files of a (possibly split) GGUF: `x-00001-of-00003.gguf` names all three; each must exist."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"{p}: no such GGUF file")
    m = _SPLIT.match(p.name)
    if m is None:
        return [p]
    n = int(m["n"])
    files = [p.with_name(f"{m['base']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{p}: split GGUF of {n} files, missing {', '.join(missing)}")
    return files


def _open(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package (pip install gguf)") from e
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct errors / numpy errors on bad files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path: Path) -> tuple[ModelConfig, int]:
    """ModelConfig from the metadata; also the number of MTP layers stored (`nextn_predict_layers`)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise ConfigError(f"{path}: general.architecture={arch!r} is not a Qwen3.5 model (expected one of "
                          f"{sorted(ARCHS)})")

    def need(key: str):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    nextn = int(_field(reader, f"{arch}.nextn_predict_layers", 0) or 0)
    n_layer = int(need("block_count")) - nextn
    head_dim = int(need("attention.key_length"))
    if int(_field(reader, f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{path}: attention value_length != key_length is not a Qwen3.5 layout")
    Hv, inner = int(need("ssm.time_step_rank")), int(need("ssm.inner_size"))
    rope_dim = int(need("rope.dimension_count"))
    sections = [int(s) for s in (_field(reader, f"{arch}.rope.dimension_sections") or [11, 11, 10, 0])]
    recurrent = _field(reader, f"{arch}.attention.recurrent_layers")
    if recurrent is not None:
        layer_types = ["linear_attention" if r else "full_attention" for r in list(recurrent)[:n_layer]]
    else:
        interval = int(_field(reader, f"{arch}.full_attention_interval", 4))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layer)]
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    d = {
        "model_type": ARCHS[arch], "vocab_size": int(embd.shape[-1]), "hidden_size": int(need("embedding_length")),
        "num_hidden_layers": n_layer, "num_attention_heads": int(need("attention.head_count")),
        "num_key_value_heads": int(need("attention.head_count_kv")), "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 262144)),
        "linear_conv_kernel_dim": int(need("ssm.conv_kernel")), "linear_key_head_dim": int(need("ssm.state_size")),
        "linear_num_key_heads": int(need("ssm.group_count")), "linear_num_value_heads": Hv,
        "linear_value_head_dim": inner // Hv, "layer_types": layer_types,
        "tie_word_embeddings": "output.weight" not in tensors, "mtp_num_hidden_layers": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(need("rope.freq_base")),
                            "partial_rotary_factor": rope_dim / head_dim, "mrope_section": sections[:3],
                            "mrope_interleaved": True},
    }
    if arch == "qwen35moe":
        d.update(num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                 moe_intermediate_size=int(need("expert_feed_forward_length")),
                 shared_expert_intermediate_size=int(need("expert_shared_feed_forward_length")))
    else:
        d["intermediate_size"] = int(need("feed_forward_length"))
    return ModelConfig.from_dict(d), nextn


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file (metadata only; `qwen35 info x.gguf`)."""
    first = gguf_shards(path)[0]
    return config_from_gguf(_open(first), first)[0]


def gguf_bytes_by_type(path: str | Path) -> dict[str, dict[str, int]]:
    """Tensors, elements and bytes of each GGUF tensor type over all split files (`qwen35 info x.gguf`)."""
    out: dict[str, dict[str, int]] = {}
    for f in gguf_shards(path):
        for x in _open(f).tensors:
            row = out.setdefault(x.tensor_type.name, {"tensors": 0, "elements": 0, "bytes": 0})
            row["tensors"] += 1
            row["elements"] += int(x.n_elements)
            row["bytes"] += int(x.n_bytes)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def vocabulary_digest(tokens) -> tuple[int, str]:
    """(count, sha1) of a vocabulary's token strings in id order, the converter's `[PAD<id>]` fillers (ids past
    the real vocabulary, up to the padded embedding size) left out: compares a GGUF's vocabulary with a
    tokenizer's."""
    import hashlib

    real = [t for t in tokens if not (t.startswith("[PAD") and t.endswith("]"))]
    return len(real), hashlib.sha1("\n".join(real).encode()).hexdigest()


def check_builtin_vocabulary(tokenizer, digest: tuple[int, str], path: str) -> None:
    """Refuse to pair a GGUF with the built-in Qwen3.5 vocabulary when its own vocabulary differs (a fine-tune
    with other tokens): ids would silently mean other text."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    ordered = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if vocabulary_digest(ordered) != digest:
        raise CheckpointError(f"{path}: the GGUF's vocabulary ({digest[0]} tokens) differs from the built-in Qwen3.5 "
                              f"vocabulary ({len(ordered)} tokens): put the model's tokenizer.json beside the GGUF")


def _gguf_tokens(reader) -> list[str] | None:
    f = reader.fields.get("tokenizer.ggml.tokens")
    if f is None:
        return None
    return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]


def _grouped_from_tiled(t: torch.Tensor, dim: int, num_k: int, per_k: int, head_dim: int) -> torch.Tensor:
    """Undo the converter's value-head reorder along `dim`: tiled [r][k][d] back to grouped [k][r][d]."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], per_k, num_k, head_dim, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def _widen(tensor) -> torch.Tensor:
    """A GGUF tensor as fp32 in torch layout (numpy shape (out, in) is torch's [out, in])."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = tensor.tensor_type
    data = np.asarray(tensor.data)
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = data.astype(np.float32)
    else:
        try:
            arr = dequantize(data, kind)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise CheckpointError(f"tensor {tensor.name}: GGUF type {kind.name} cannot be read ({e})") from None
    shape = tuple(int(s) for s in reversed(tensor.shape))  # GGUF lists dims innermost first
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape)


def load_gguf(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu", progress: bool = True):
    """A Qwen35Model from a GGUF file (the first of split files), every tensor widened to `dtype`."""
    from tqdm.auto import tqdm

    from qwen35.weights.loader import build_empty

    files = gguf_shards(path)
    readers = [_open(f) for f in files]
    config, nextn = config_from_gguf(readers[0], files[0])
    t = config.text
    tensors = {}
    for f, r in zip(files, readers, strict=True):
        for x in r.tensors:
            if x.name in tensors:
                raise CheckpointError(f"{f}: tensor {x.name} appears in two of the split files")
            tensors[x.name] = x
    model = build_empty(config, dtype, device, with_mtp=False, with_vision=False)
    params = dict(model.named_parameters())
    num_k, num_v = t.linear_num_key_heads, t.linear_num_value_heads
    per_k, reorder = num_v // num_k, num_v != num_k
    qk = 2 * num_k * t.linear_key_head_dim
    filled: dict[str, set] = {}
    unexpected, misshapen, mtp = [], [], []
    bar = tqdm(total=len(tensors), desc="loading GGUF", unit="tensor", disable=not progress or len(tensors) < 500)
    with torch.no_grad():
        for name, x in tensors.items():
            bar.update(1)
            m = re.match(r"^blk\.(\d+)\.(.+)$", name)
            if m is not None and int(m[1]) >= t.num_hidden_layers:
                mtp.append(name)  # the MTP block (blk.{n_layer}.*): not loaded yet
                continue
            leaf = m[2] if m else name
            target = (f"model.layers.{m[1]}." + _BLOCK[leaf]) if m and leaf in _BLOCK else _GLOBAL.get(name)
            if target is None or (target == "lm_head.weight" and model.lm_head is None):
                unexpected.append(name)
                continue
            w = _widen(x)
            if leaf in _PLUS_ONE:
                w = w - 1.0
            elif leaf == "ssm_a":
                w = torch.log(-w)
            if reorder and leaf in ("ssm_a", "ssm_dt.bias", "ssm_alpha.weight", "ssm_beta.weight"):
                w = _grouped_from_tiled(w, 0, num_k, per_k, 1)
            elif reorder and leaf == "attn_gate.weight":
                w = _grouped_from_tiled(w, 0, num_k, per_k, t.linear_value_head_dim)
            elif reorder and leaf in ("attn_qkv.weight", "ssm_conv1d.weight"):
                w = torch.cat([w[:qk], _grouped_from_tiled(w[qk:], 0, num_k, per_k, t.linear_value_head_dim)])
            elif reorder and leaf == "ssm_out.weight":
                w = _grouped_from_tiled(w, 1, num_k, per_k, t.linear_value_head_dim)
            if leaf == "ssm_conv1d.weight":
                w = w.unsqueeze(1)
            dst = params[target].data
            part = None
            if leaf in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
                part = 0 if leaf.startswith("ffn_gate") else 1
                half = dst.shape[1] // 2
                dst = dst[:, part * half:(part + 1) * half]
            if tuple(w.shape) != tuple(dst.shape):
                misshapen.append(f"{name} ({x.tensor_type.name}): {list(w.shape)} for {target} "
                                 f"{list(dst.shape)}")
                continue
            dst.copy_(w)
            filled.setdefault(target, set()).add(part)
    bar.close()
    missing = [f"{n}: expected {list(p.shape)}" for n, p in params.items()
               if n not in filled or (n.endswith("experts.gate_up_proj") and filled[n] != {0, 1})]
    if missing or unexpected or misshapen:
        parts = [f"{label}:\n  " + "\n  ".join(items[:50]) for label, items in
                 (("missing tensors", missing), ("unexpected tensors", unexpected),
                  ("tensors with the wrong shape", misshapen)) if items]
        raise CheckpointError(f"{files[0]} does not match its own metadata:\n" + "\n".join(parts))
    kinds: dict[str, int] = {}
    for name, x in tensors.items():
        if name not in mtp:
            kinds[x.tensor_type.name] = kinds.get(x.tensor_type.name, 0) + 1
    report = [f"GGUF {files[0].name}: {len(tensors) - len(mtp)} tensors widened to {dtype} ("
              + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])) + ")"]
    if mtp:
        report.append(f"GGUF MTP layer ({len(mtp)} tensors of blk.{t.num_hidden_layers}) not loaded yet")
    for line in report:
        log.info(line)
    model.load_report = report
    model.quantization = None
    tokens = _gguf_tokens(readers[0])
    model.gguf_vocabulary = vocabulary_digest(tokens) if tokens is not None else None
    return model
