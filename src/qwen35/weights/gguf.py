"""GGUF files (llama.cpp) of Qwen3.5: metadata -> ModelConfig, tensors back to our layout (read with `gguf`).

The converter (`convert_hf_to_gguf.py`, `conversion/qwen.py` of llama.cpp, architectures `qwen35` / `qwen35moe`)
renames every tensor and transforms some; this module undoes each transform:
  * zero-centred norm weights are stored as w + 1 (every `*norm.weight` but the GDN's gated `ssm_norm`);
  * `A_log` is stored as `ssm_a` = -exp(A_log); `dt_bias` as `ssm_dt.bias`; conv1d [C, 1, 4] squeezed to [C, 4];
  * with key heads != value heads, the value heads are tiled [k0v0, k1v0, k0v1, ...] instead of grouped by key
    head [k0v0, k0v1, k1v0, ...]: in the v rows of `attn_qkv`, the rows of `attn_gate`, `ssm_alpha`,
    `ssm_beta`, `ssm_a`, `ssm_dt`, the v channels of `ssm_conv1d` and the input columns of `ssm_out`;
  * routed experts are stored as three [E, ...] tensors (gate and up apart);
  * the MTP layer is block n_layer: `blk.{n}.nextn.{eh_proj,enorm,hnorm,shared_head_norm}` and the block's own
    attention and FFN tensors.
Below float32, tensors of the types with kernels (Q8_0, Q4_K, Q5_K, Q6_K: `ops/quant/gguf.py`) stay in their
blocks: row reorders move whole rows of bytes, and the one column reorder (`ssm_out`) gathers the activations
instead (`QuantLinear.in_order`). Every other tensor, and every tensor under float32, is widened exactly (the
fp32 values `gguf.quants.dequantize` gives), in threads, then cast to the model dtype.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen35.config import ConfigError, ModelConfig
from qwen35.ops.quant.gguf import KEPT_TYPES
from qwen35.weights.gguf_file import GGUFFile, GGUFTensor
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
_MTP = {"nextn.eh_proj.weight": "mtp.fc.weight", "nextn.enorm.weight": "mtp.pre_fc_norm_embedding.weight",
        "nextn.hnorm.weight": "mtp.pre_fc_norm_hidden.weight", "nextn.shared_head_norm.weight": "mtp.norm.weight"}
_PLUS_ONE = ("attn_norm.weight", "post_attention_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight",
             "output_norm.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "nextn.shared_head_norm.weight")
# leaves whose value heads the converter tiled: rows of head_dim (None: the value head dim), or the columns
_ROWS_TILED = {"ssm_a": 1, "ssm_dt.bias": 1, "ssm_alpha.weight": 1, "ssm_beta.weight": 1, "attn_gate.weight": None}
_V_ROWS_TILED = ("attn_qkv.weight", "ssm_conv1d.weight")  # only the rows after q and k


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


def _open(path: Path) -> GGUFFile:
    try:
        import gguf  # noqa: F401  (types, block sizes and widening come from it)
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package (pip install gguf)") from e
    try:
        return GGUFFile(path)
    except CheckpointError as e:
        if "not a GGUF file" in str(e):
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
        raise


def _field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def config_from_gguf(reader: GGUFFile, path: Path) -> tuple[ModelConfig, int]:
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
        "model_type": ARCHS[arch], "vocab_size": int(embd.shape[0]), "hidden_size": int(need("embedding_length")),
        "num_hidden_layers": n_layer, "num_attention_heads": int(need("attention.head_count")),
        "num_key_value_heads": int(need("attention.head_count_kv")), "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 262144)),
        "linear_conv_kernel_dim": int(need("ssm.conv_kernel")), "linear_key_head_dim": int(need("ssm.state_size")),
        "linear_num_key_heads": int(need("ssm.group_count")), "linear_num_value_heads": Hv,
        "linear_value_head_dim": inner // Hv, "layer_types": layer_types,
        "tie_word_embeddings": "output.weight" not in tensors, "mtp_num_hidden_layers": nextn,
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
            row = out.setdefault(x.type_name, {"tensors": 0, "elements": 0, "bytes": 0})
            row["tensors"] += 1
            row["elements"] += int(x.n_elements)
            row["bytes"] += int(x.n_bytes)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def gguf_loaded_bytes(path: str | Path, dtype_bytes: int = 2) -> int:
    """Weight bytes of the model loaded below float32: tensors of kernel types as stored, the rest widened to
    `dtype_bytes` per element (`qwen35 info x.gguf`)."""
    total = 0
    for f in gguf_shards(path):
        for x in _open(f).tensors:
            total += x.n_bytes if x.type_id in KEPT_TYPES else x.n_elements * dtype_bytes
    return total


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


def _gguf_tokens(reader: GGUFFile) -> list[str] | None:
    return None if reader.fields.get("tokenizer.ggml.tokens") is None else _gguf_tokens_of(reader.fields)


def _grouped_from_tiled(t: torch.Tensor, dim: int, num_k: int, per_k: int, head_dim: int) -> torch.Tensor:
    """Undo the converter's value-head reorder along `dim`: tiled [r][k][d] back to grouped [k][r][d]."""
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], per_k, num_k, head_dim, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def _reorder_rows(w: torch.Tensor, leaf: str, t, qk: int) -> torch.Tensor:
    """Value heads back from tiled to grouped order along the rows (float values or whole rows of block bytes)."""
    num_k, num_v = t.linear_num_key_heads, t.linear_num_value_heads
    per_k = num_v // num_k
    if leaf in _ROWS_TILED:
        return _grouped_from_tiled(w, 0, num_k, per_k, _ROWS_TILED[leaf] or t.linear_value_head_dim)
    return torch.cat([w[:qk], _grouped_from_tiled(w[qk:], 0, num_k, per_k, t.linear_value_head_dim)])


def _ssm_out_order(t) -> torch.Tensor:
    """`QuantLinear.in_order` of a kept `ssm_out`: its stored column i multiplies our value channel in_order[i]."""
    per_k = t.linear_num_value_heads // t.linear_num_key_heads
    ours_from_stored = _grouped_from_tiled(torch.arange(t.linear_num_value_heads * t.linear_value_head_dim), 0,
                                           t.linear_num_key_heads, per_k, t.linear_value_head_dim)
    return torch.argsort(ours_from_stored)


def _widen(x: GGUFTensor) -> torch.Tensor:
    """A GGUF tensor as its exact fp32 values, torch layout."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = x.read()
    if x.type_id == GGMLQuantizationType.F32:
        arr = raw.view(np.float32)
    elif x.type_id == GGMLQuantizationType.F16:
        arr = raw.view(np.float16).astype(np.float32)
    elif x.type_id in KEPT_TYPES:  # the torch twin: the same values, faster than numpy
        fmt = KEPT_TYPES[x.type_id]
        q = torch.from_numpy(raw).reshape(-1, fmt.row_bytes(x.shape[-1]))
        return fmt.dequantize({"qweight": q}).reshape(x.shape)
    else:
        try:
            arr = dequantize(raw.reshape(-1, raw.size // max(1, x.n_elements // x.shape[-1])), x.type_id)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise CheckpointError(f"{x.path}: tensor {x.name}: GGUF type {x.type_name} cannot be read ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(x.shape)


@dataclass
class _Place:
    """Where one GGUF tensor goes: our parameter `target` (in module `module`), the gate (0) or up (1) half of fused
    experts (`part`), and whether it stays in its blocks (`kept`)."""

    tensor: GGUFTensor
    leaf: str
    target: str
    module: str
    part: int | None = None
    kept: bool = False


def _plan(tensors: dict[str, GGUFTensor], n_layer: int, nextn: int) -> tuple[list[_Place], list[str]]:
    places, unexpected = [], []
    for name, x in tensors.items():
        m = re.match(r"^blk\.(\d+)\.(.+)$", name)
        target = None
        if m is None:
            leaf, target = name, _GLOBAL.get(name)
        else:
            layer, leaf = int(m[1]), m[2]
            if layer < n_layer and leaf in _BLOCK:
                target = f"model.layers.{layer}.{_BLOCK[leaf]}"
            elif layer == n_layer and nextn == 1:
                target = _MTP.get(leaf) or (f"mtp.layers.0.{_BLOCK[leaf]}" if leaf in _BLOCK else None)
        if target is None:
            unexpected.append(name)
            continue
        part = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1}.get(leaf)
        places.append(_Place(x, leaf, target, target.rsplit(".", 1)[0], part))
    return places, unexpected


def _choose_kept(places: list[_Place], meta_model) -> dict[str, tuple[str, tuple]]:
    """Modules that keep their GGUF blocks: module path -> (kind, formats). A Linear whose tensor has a kernel type;
    routed experts whose gate and up share one such type and whose down has one; the token embedding."""
    from qwen35.model.mlp import Experts
    from qwen35.ops.linear import Linear

    by_module: dict[str, list[_Place]] = {}
    for p in places:
        by_module.setdefault(p.module, []).append(p)
    kept: dict[str, tuple[str, tuple]] = {}
    for path, ps in by_module.items():
        try:
            module = meta_model.get_submodule(path)
        except AttributeError:
            continue  # not ours: reported by the shape check
        types = {p.leaf: p.tensor.type_id for p in ps}
        if isinstance(module, Linear) and len(ps) == 1 and ps[0].tensor.type_id in KEPT_TYPES:
            kept[path] = ("linear", (KEPT_TYPES[ps[0].tensor.type_id],))
        elif isinstance(module, Experts) and len(ps) == 3:
            g, u, d = (types.get(k) for k in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"))
            if g == u and g in KEPT_TYPES and d in KEPT_TYPES:
                kept[path] = ("experts", (KEPT_TYPES[g], KEPT_TYPES[d]))
        elif isinstance(module, torch.nn.Embedding) and ps[0].tensor.type_id in KEPT_TYPES:
            kept[path] = ("embedding", (KEPT_TYPES[ps[0].tensor.type_id],))
    return kept


def _swap_kept(model, kept: dict[str, tuple[str, tuple]], dtype: torch.dtype, reorder: bool) -> None:
    """Replace the kept modules of a meta-device model by their GGUF-format versions (nothing allocated)."""
    from qwen35.ops.quant import QuantExperts, QuantLinear
    from qwen35.ops.quant.base import QuantEmbedding

    for path, (kind, fmts) in kept.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, attr)
        if kind == "linear":
            order = None
            if reorder and path.endswith("linear_attn.out_proj"):
                order = torch.empty(old.in_features, dtype=torch.int64, device="meta")
            new = QuantLinear(fmts[0], fmts[0].empty([old.out_features], old.in_features, device="meta"),
                              old.in_features, old.out_features, in_order=order)
        elif kind == "experts":
            E, two_i, H = old.gate_up_proj.shape
            new = QuantExperts.empty(fmts[0], E, H, two_i // 2, device="meta", down_fmt=fmts[1])
        else:
            new = QuantEmbedding(fmts[0], fmts[0].empty([old.num_embeddings], old.embedding_dim, device="meta"),
                                 old.num_embeddings, old.embedding_dim, dtype)
        setattr(parent, attr, new)


def _destination(p: _Place, params: dict[str, torch.Tensor]) -> tuple[str, tuple[int, ...]]:
    """The state-dict entry a tensor is written to and the shape the tensor must have (torch order)."""
    if p.kept:
        if p.part is not None or p.leaf == "ffn_down_exps.weight":
            proj = "down_proj" if p.part is None else "gate_up_proj"
            key = f"{p.module}.{proj}_qweight"
        else:
            key = f"{p.module}.qweight"
        return key, ()  # the logical shape is checked against the module (below)
    dst = params[p.target]
    shape = tuple(dst.shape)
    if p.part is not None:
        shape = (shape[0], shape[1] // 2, shape[2])
    if p.leaf == "ssm_conv1d.weight":
        shape = (shape[0], shape[2])  # stored squeezed
    return p.target, shape


def _kept_shape(module, p: _Place) -> tuple[int, ...]:
    from qwen35.ops.quant.base import QuantEmbedding

    if isinstance(module, QuantEmbedding):
        return (module.num_embeddings, module.embedding_dim)
    if hasattr(module, "num_experts"):
        if p.part is not None:
            return (module.num_experts, module.inner, module.hidden)
        return (module.num_experts, module.hidden, module.inner)
    return (module.out_features, module.in_features)


def load_gguf(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu", progress: bool = True,
              keep_quantized: bool | None = None):
    """A Qwen35Model from a GGUF file (the first of split files). `keep_quantized` (default: below float32) keeps
    Q8_0 / Q4_K / Q5_K / Q6_K tensors in their blocks; everything else is widened to `dtype`."""
    from tqdm.auto import tqdm

    from qwen35.model import Qwen35Model
    from qwen35.ops.quant.base import QuantEmbedding, QuantLinear
    from qwen35.weights.loader import build_empty

    keep = dtype != torch.float32 if keep_quantized is None else keep_quantized
    files = gguf_shards(path)
    readers = [_open(f) for f in files]
    config, nextn = config_from_gguf(readers[0], files[0])
    if nextn > 1:
        raise CheckpointError(f"{files[0]}: {nextn} MTP layers (nextn_predict_layers); Qwen3.5 has one")
    t = config.text
    tensors: dict[str, GGUFTensor] = {}
    for f, r in zip(files, readers, strict=True):
        for x in r.tensors:
            if x.name in tensors:
                raise CheckpointError(f"{f}: tensor {x.name} appears in two of the split files")
            tensors[x.name] = x
    places, unexpected = _plan(tensors, t.num_hidden_layers, nextn)
    reorder = t.linear_num_key_heads != t.linear_num_value_heads
    qk = 2 * t.linear_num_key_heads * t.linear_key_head_dim

    # Every tensor's destination and shape checked on a meta-device model before any storage is allocated.
    meta = Qwen35Model.on_meta(config, with_mtp=nextn > 0, with_vision=False).to(dtype)
    kept = _choose_kept(places, meta) if keep else {}
    _swap_kept(meta, kept, dtype, reorder)
    params = dict(meta.state_dict(keep_vars=True))
    filled: dict[str, set] = {}
    misshapen = []
    for p in places:
        p.kept = p.module in kept
        if p.target == "lm_head.weight" and meta.lm_head is None:
            unexpected.append(p.tensor.name)
            continue
        if not p.kept and p.target not in params:
            unexpected.append(p.tensor.name)
            continue
        key, want = _destination(p, params)
        if p.kept:
            want = _kept_shape(meta.get_submodule(p.module), p)
        elif len(want) == 2 and want[0] == 1 and tuple(p.tensor.shape) == want[1:]:
            want = want[1:]  # llama.cpp's quantize stores the [1, H] shared-expert gate as [H]
        if tuple(p.tensor.shape) != want:
            misshapen.append(f"{p.tensor.name} ({p.tensor.type_name}): {list(p.tensor.shape)} for {p.target} "
                             f"{list(want)}")
            continue
        got = filled.setdefault(key, set())
        if p.part in got:
            misshapen.append(f"{p.tensor.name}: a second tensor for {p.target}")
        got.add(p.part)
    derived = {n for n in params if n.endswith(".in_order")}
    missing = [f"{n}: expected {list(v.shape)}" for n, v in params.items() if n not in derived and
               (n not in filled or (re.search(r"experts\.gate_up_proj(_qweight)?$", n) and filled[n] != {0, 1}))]
    if missing or unexpected or misshapen:
        parts = [f"{label}:\n  " + "\n  ".join(items[:50]) for label, items in
                 (("missing tensors", missing), ("unexpected tensors", unexpected),
                  ("tensors with the wrong shape", misshapen)) if items]
        raise CheckpointError(f"{files[0]} does not match its own metadata:\n" + "\n".join(parts))
    del meta, params

    model = build_empty(config, dtype, device, with_mtp=nextn > 0, with_vision=False,
                        swap=lambda m: _swap_kept(m, kept, dtype, reorder))
    params = dict(model.state_dict(keep_vars=True))
    for path_ in kept:
        module = model.get_submodule(path_)
        if isinstance(module, QuantLinear) and module.in_order is not None:
            module.in_order.copy_(_ssm_out_order(t))

    def fill(p: _Place) -> int:
        key, _ = _destination(p, params)
        dst = params[key].data
        x = p.tensor
        if p.kept:
            if p.part is not None:  # gate or up half of each expert's fused rows
                inner = dst.shape[1] // 2
                per = x.n_bytes // dst.shape[0]
                for e in range(dst.shape[0]):
                    x.read_into(dst[e, p.part * inner:(p.part + 1) * inner].numpy(), start=e * per)
            elif reorder and (p.leaf in _ROWS_TILED or p.leaf in _V_ROWS_TILED):
                raw = torch.from_numpy(x.read()).reshape(dst.shape)
                dst.copy_(_reorder_rows(raw, p.leaf, t, qk))
            else:
                x.read_into(dst.numpy())
            return x.n_bytes
        w = _widen(x)
        if p.leaf in _PLUS_ONE:
            w = w - 1.0
        elif p.leaf == "ssm_a":
            w = torch.log(-w)
        if reorder and (p.leaf in _ROWS_TILED or p.leaf in _V_ROWS_TILED):
            w = _reorder_rows(w, p.leaf, t, qk)
        elif reorder and p.leaf == "ssm_out.weight":
            w = _grouped_from_tiled(w, 1, t.linear_num_key_heads,
                                    t.linear_num_value_heads // t.linear_num_key_heads, t.linear_value_head_dim)
        if p.leaf == "ssm_conv1d.weight":
            w = w.unsqueeze(1)
        if p.part is not None:
            half = dst.shape[1] // 2
            dst = dst[:, p.part * half:(p.part + 1) * half]
        dst.copy_(w.reshape(dst.shape))  # (a [1, H] gate may be stored as [H])
        return x.n_bytes

    total = sum(p.tensor.n_bytes for p in places)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading GGUF",
               disable=not progress or total < (256 << 20))
    order = sorted(places, key=lambda p: (p.tensor.path, p.tensor.offset))  # one pass through each file
    workers = max(1, min(4, torch.get_num_threads()))
    with torch.no_grad(), ThreadPoolExecutor(workers) as pool:
        for n in pool.map(fill, order):
            bar.update(n)
    bar.close()
    emb = model.model.embed_tokens
    if isinstance(emb, QuantEmbedding) and model.lm_head is None:  # the tied head reads the embedding's blocks
        model.lm_head = QuantLinear(emb.fmt, emb.tensors, emb.embedding_dim, emb.num_embeddings)

    def counts(ps: list[_Place]) -> str:
        c: dict[str, int] = {}
        for p in ps:
            c[p.tensor.type_name] = c.get(p.tensor.type_name, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in sorted(c.items(), key=lambda kv: -kv[1]))

    kept_places = [p for p in places if p.kept]
    widened = [p for p in places if not p.kept]
    report = []
    if kept_places:
        report.append(f"GGUF {files[0].name}: {len(kept_places)} tensors kept quantized ({counts(kept_places)}), "
                      f"{len(widened)} widened to {dtype} ({counts(widened)})")
        lossy = [p.tensor.name for p in widened if p.tensor.type_id not in (0, 1, 30)]  # not F32 / F16 / BF16
        if lossy:
            report.append(f"GGUF tensors of types without kernels, widened: {', '.join(lossy[:12])}"
                          + (f" and {len(lossy) - 12} more" if len(lossy) > 12 else ""))
    else:
        report.append(f"GGUF {files[0].name}: {len(widened)} tensors widened to {dtype} ({counts(widened)})")
    if nextn:
        report.append(f"GGUF MTP layer (blk.{t.num_hidden_layers}) loaded")
    for line in report:
        log.info(line)
    model.load_report = report
    model.quantization = "gguf" if kept_places else None
    tokens = _gguf_tokens(readers[0])
    model.gguf_vocabulary = vocabulary_digest(tokens) if tokens is not None else None
    model.gguf_path = files[0]
    return model


_TOKENIZER_KEYS = ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")


def gguf_tokenizer(path: str | Path, digest: tuple[int, str] | None = None):
    """The tokenizer of a GGUF that has no tokenizer files beside it: the built-in Qwen3.5 vocabulary when the
    file's own token list is the same (`digest`, from `vocabulary_digest`), else one built from its
    `tokenizer.ggml.*` metadata; either way with the file's chat template and EOS ids where it has them."""
    from qwen35.tokenizer import DEFAULT_EOS_TOKEN_IDS, load_tokenizer, tokenizer_from_gguf

    fields = _open(gguf_shards(path)[0]).fields
    tokenizer = load_tokenizer(None)
    if fields.get("tokenizer.ggml.tokens") is None:
        log.info("%s has no tokenizer.ggml.tokens: using the built-in Qwen3.5 vocabulary", path)
    else:
        try:
            check_builtin_vocabulary(tokenizer, digest or vocabulary_digest(_gguf_tokens_of(fields)), str(path))
        except CheckpointError:
            log.info("%s: its vocabulary differs from the built-in Qwen3.5 one: tokenizer built from its metadata",
                     path)
            return tokenizer_from_gguf(fields, str(path))
    if fields.get("tokenizer.chat_template"):
        tokenizer.chat_template = fields["tokenizer.chat_template"]
    eos = [int(fields[k]) for k in _TOKENIZER_KEYS[1:] if fields.get(k) is not None]
    tokenizer.eos_token_ids = tuple(dict.fromkeys([*eos, *DEFAULT_EOS_TOKEN_IDS]))
    return tokenizer


def _gguf_tokens_of(fields: dict) -> list[str]:
    return [str(t) for t in fields["tokenizer.ggml.tokens"]]
