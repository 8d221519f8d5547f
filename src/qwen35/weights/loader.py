"""`load_model`: build a `Qwen35Model` from a checkpoint folder, a hub id, or (dummy) a preset."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qwen35.config import ModelConfig, find_preset
from qwen35.model import Qwen35Model
from qwen35.model.mlp import Experts
from qwen35.ops.hugepages import advise_hugepages, place_on_hugepages, release_free_memory
from qwen35.ops.linear import Linear, fuse_projections
from qwen35.ops.quant import FP8, QuantExperts, QuantLinear
from qwen35.ops.quant.fp8 import BLOCK, scale_rows
from qwen35.parallel import TensorParallel
from qwen35.parallel.layout import Sharder
from qwen35.weights.dummy import init_dummy_weights
from qwen35.weights.fp8 import FP8Plan, FP8Spec, plan_fp8
from qwen35.weights.gguf import is_gguf
from qwen35.weights.hub import resolve_model_path
from qwen35.weights.names import Target, target_of
from qwen35.weights.safetensors_io import CheckpointError, SafetensorsReader, checkpoint_files, tensor_shapes

log = logging.getLogger("qwen35")

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATIONS = (None, "int8", "fp8")
_PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar for checkpoints of 1 GiB or more


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        ok = dtype
    else:
        ok = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}.get(str(dtype).lower())
        if ok is None:
            raise ValueError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
    if ok not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype}: expected float32, bfloat16 or float16")
    return ok


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Uninitialised storage on `device` for every meta parameter and buffer (what `Module.to_empty` does, but
    with plain `torch.empty`: `to_empty` runs `empty_like` on meta tensors through torch's reference kernels, whose
    first use imports sympy and torch.fx, ~40 MiB held for the rest of the process)."""
    made: dict[int, torch.Tensor] = {}  # by the meta tensor's id: a tensor shared by two modules stays shared

    def fresh(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            data = torch.empty(t.shape, dtype=t.dtype, device=device) if t.is_meta else t.detach().to(device)
            made[id(t)] = (torch.nn.Parameter(data, requires_grad=t.requires_grad and data.is_floating_point())
                           if isinstance(t, torch.nn.Parameter) else data)
        return made[id(t)]

    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None:
                    table[name] = fresh(t)


def build_empty(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, with_mtp: bool,
                with_vision: bool, swap: Callable[[Qwen35Model], None] | None = None,
                tp: TensorParallel | None = None) -> Qwen35Model:
    """The model (this rank's share of it under `tp`) with uninitialised storage on `device` (no time spent on
    random init). `swap` may replace modules of the meta-device model first (e.g. by FP8 ones), so nothing is
    allocated for what they replace."""
    model = Qwen35Model.on_meta(config, with_mtp=with_mtp, with_vision=with_vision, tp=tp).to(dtype)
    if swap is not None:
        swap(model)
    _materialize(model, torch.device(device))
    for t in [*model.parameters(), *model.buffers()]:
        advise_hugepages(t)  # before the first write: the weights then fault in as 2 MiB pages (ops/hugepages.py)
    for m in model.modules():
        reset = getattr(m, "reset_buffers", None)
        if callable(reset):  # buffers that follow from the config (rotary tables, FP8 scale rows)
            reset()
    model.requires_grad_(False)  # an inference engine: no autograd bookkeeping anywhere
    return model.eval()


def load_model(path_or_id: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               load_format: str = "auto", seed: int = 0, progress: bool = True,
               quantization: str | None = None, tensor_parallel: TensorParallel | None = None) -> Qwen35Model:
    """Load a Qwen3.5 model in eval mode.

    `path_or_id`: a checkpoint folder, a hub id (`Qwen/Qwen3.5-0.8B`), or with `load_format="dummy"` a
    preset name (`Qwen3.5-397B-A17B`) or a folder holding only `config.json`.
    `quantization="int8"`: weight-only int8 (per-row scales) for the linear layers after loading;
    `quantization="fp8"`: block-128 FP8 made at load from a BF16 checkpoint (a no-op on an FP8 checkpoint).
    FP8 checkpoints stay in 8 bits, except with `dtype=float32`, which widens them exactly. GGUF files (`x.gguf`,
    the first of split files) likewise keep their Q8_0 / Q4_K / Q5_K / Q6_K tensors quantized below float32.
    `tensor_parallel`: this process is one rank of a group (torch.distributed set up by the caller) and loads
    its share of every layer only (qwen35.parallel.layout), from safetensors or dummy weights.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS}")
    tp = tensor_parallel if tensor_parallel is not None and tensor_parallel.size > 1 else None
    model = _load(path_or_id, dtype, device, load_format, seed, progress, quantization, tp)
    stored = getattr(model, "quantization", None)
    if quantization is not None and stored is None:
        from qwen35.ops.quant import quantize_model

        quantize_model(model, quantization)
    # one product per group of projections sharing an input (see ops/linear.py FusedLinears), then 2 MiB
    # pages for everything: decoding streams every weight per token (see ops/hugepages.py)
    fuse_projections(model)
    place_on_hugepages(model)
    release_free_memory()  # the load's temporaries (read buffers, the parts fusing replaced) leave the RSS
    return model


def auto_dtype(path_or_id: str | Path, device: torch.device | str, load_format: str = "auto",
               quantization: str | None = None) -> torch.dtype:
    """dtype "auto": bfloat16 on a GPU, for FP8 weights (an FP8 checkpoint or quantization="fp8") and for GGUF
    files, which stay quantized only below float32; float32 otherwise on CPU (exact)."""
    if torch.device(device).type == "cuda" or quantization == "fp8":
        return torch.bfloat16
    if load_format in ("auto", "gguf") and is_gguf(path_or_id):
        return torch.bfloat16  # GGUF blocks stay quantized only below float32
    if load_format != "dummy":
        p = Path(path_or_id).expanduser()
        config = p / "config.json" if p.is_dir() else None
        if config is None and not p.exists() and str(path_or_id).count("/") == 1:
            try:
                config = resolve_model_path(str(path_or_id), weights=False) / "config.json"
            except Exception:  # an unresolvable id fails with its own error when loading
                config = None
        if config is not None and config.is_file():
            try:
                if (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method") == "fp8":
                    return torch.bfloat16
            except (OSError, ValueError):
                pass  # an unreadable config fails with its own error when loading
    return torch.float32


def _load(path_or_id, dtype, device, load_format, seed, progress, quantization, tp=None) -> Qwen35Model:
    dtype = _as_dtype(dtype)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r}: expected one of {LOAD_FORMATS}")
    if load_format == "dummy":
        p = Path(path_or_id)
        if p.is_dir():
            config = ModelConfig.from_file(p)
        else:
            config = find_preset(str(path_or_id))
            if config is None:
                config = ModelConfig.from_file(resolve_model_path(str(path_or_id), weights=False))
        if tp is not None:
            return _dummy_share(config, dtype, device, seed, tp)
        model = build_empty(config, dtype, device, with_mtp=config.text.mtp_num_hidden_layers > 0,
                            with_vision=config.vision is not None)
        if torch.device(device).type == "meta":
            model.load_report = ["meta device: shapes only, no storage (capacity planning)"]
        else:
            init_dummy_weights(model, seed=seed)
            model.load_report = ["dummy weights (random, seeded)"]
        return model
    if load_format == "gguf" or (load_format == "auto" and is_gguf(path_or_id)):
        from qwen35.weights.gguf import load_gguf

        if quantization is not None:
            raise ValueError(f"{path_or_id} is a GGUF file: quantization={quantization!r} cannot be applied to it "
                             "(its tensors keep their GGUF types below float32)")
        if tp is not None:
            raise ValueError(f"{path_or_id} is a GGUF file: tensor parallelism over GGUF files is not supported yet")
        return load_gguf(path_or_id, dtype, device, progress=progress)
    folder = resolve_model_path(str(path_or_id), weights=True)
    config = ModelConfig.from_file(folder)
    spec = FP8Spec.from_config(config.quantization) if config.quantization is not None else None
    if spec is not None and quantization not in (None, "fp8"):
        raise ValueError(f"{folder} is an FP8 checkpoint: quantization={quantization!r} cannot be applied to it "
                         "(leave quantization unset, or 'fp8')")
    files = checkpoint_files(folder)
    keep_fp8 = dtype != torch.float32 or quantization == "fp8"
    return load_weights(config, files, dtype, device, progress=progress, fp8=spec, keep_fp8=keep_fp8, tp=tp)


def _dummy_share(config: ModelConfig, dtype: torch.dtype, device, seed: int, tp: TensorParallel) -> Qwen35Model:
    """This rank's share of the dummy weights one process would make with `seed` (made whole, then cut: for
    tests and small models)."""
    full = build_empty(config, dtype, "cpu", with_mtp=config.text.mtp_num_hidden_layers > 0,
                       with_vision=config.vision is not None)
    init_dummy_weights(full, seed=seed)
    model = build_empty(config, dtype, device, with_mtp=full.mtp is not None, with_vision=full.visual is not None,
                        tp=tp)
    sharder = Sharder(config.text, tp)
    whole = full.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, dst in model.state_dict(keep_vars=True).items():
            dst.data.copy_(_share_of(sharder, name, whole[name].data))
    model.load_report = [f"dummy weights (random, seeded), rank {tp.rank} of {tp.size}'s share"]
    return model


def _share_of(sharder: Sharder, name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's share of a whole parameter `full` (fused experts: of every expert it holds)."""
    if _EXPERTS_GATE_UP.search(name) or _EXPERTS_DOWN.search(name):
        if sharder.tp.expert_parallel:
            a, b = sharder.tp.part(full.shape[0])
            return full[a:b]
        return torch.stack([sharder.piece(name, full[e]) for e in range(full.shape[0])])
    return sharder.piece(name, full)


def _fp8_target(t: Target, field: str) -> Target:
    """Where an FP8 weight (`field` "qweight") or its scale ("scale") goes in the module that replaced the
    Linear / Experts it belongs to."""
    if t.expert is not None:
        return Target(f"{t.param}_{field}", t.expert, t.part)
    return Target(t.param[: -len(".weight")] + "." + field, None, None)


def _swap_fp8_modules(model: Qwen35Model, plan: FP8Plan) -> int:
    """Replace every Linear / Experts that the checkpoint stores in FP8 by its FP8 module (on the meta device)."""
    problems, swapped = [], 0
    for name in plan.scale_of:
        t = target_of(name)
        path = t.param.rsplit(".", 1)[0]  # the Linear of "<path>.weight", or the Experts of "<path>.gate_up_proj"
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # not ours: reported as unexpected by the plan
        if isinstance(module, (QuantLinear, QuantExperts)):
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(module, Linear) and t.expert is None:
            setattr(parent, attr, QuantLinear.empty(FP8, module.in_features, module.out_features, device="meta"))
        elif isinstance(module, Experts) and t.expert is not None:
            E, two_i, H = module.gate_up_proj.shape
            setattr(parent, attr, QuantExperts.empty(FP8, E, H, two_i // 2, device="meta"))
        else:
            problems.append(f"{name}: FP8 weight for {path} ({type(module).__name__}), which qwen35 keeps in full "
                            "precision")
            continue
        swapped += 1
    if problems:
        raise CheckpointError("FP8 checkpoint is malformed:\n  " + "\n  ".join(problems[:50]))
    return swapped


def load_weights(config: ModelConfig, files: dict[str, Path], dtype: torch.dtype,
                 device: str | torch.device = "cpu", progress: bool = True, fp8: FP8Spec | None = None,
                 keep_fp8: bool = True, tp: TensorParallel | None = None) -> Qwen35Model:
    """Build the model for `config` and fill it from checkpoint `files`. FP8 weights (see weights/fp8.py) are
    kept in 8 bits (`keep_fp8`) or widened exactly into the model dtype. Under `tp` the model is this rank's
    share: each tensor is checked against the whole model's shape, read (one at a time) and cut; experts other
    ranks hold are not read."""
    shapes = tensor_shapes(files)
    fp8_plan = plan_fp8(shapes, fp8)  # every FP8 weight and scale checked before anything is allocated
    scales = fp8_plan.scales
    names = [n for n in shapes if n not in scales or keep_fp8]
    has_mtp = any(n.startswith("mtp.") for n in names)
    has_vision = any(n.startswith("model.visual.") for n in names)
    report: list[str] = []
    if config.text.mtp_num_hidden_layers > 0 and not has_mtp:
        report.append("config declares an MTP layer but the checkpoint has no mtp.* weights: MTP head disabled")
    if config.vision is not None and not has_vision:
        report.append("config declares a vision tower but the checkpoint has no model.visual.* weights: "
                      "text only")
    if has_mtp and config.text.mtp_num_hidden_layers == 0:
        raise CheckpointError("checkpoint has mtp.* weights but config.json declares mtp_num_hidden_layers=0")
    if has_vision and config.vision is None:
        raise CheckpointError("checkpoint has model.visual.* weights but config.json has no vision_config")
    kept_fp8 = bool(fp8_plan.scale_of) and keep_fp8
    swap = (lambda m: _swap_fp8_modules(m, fp8_plan)) if kept_fp8 else None
    model = build_empty(config, dtype, device, with_mtp=has_mtp, with_vision=has_vision, swap=swap, tp=tp)
    # parameters and the FP8 modules' stored buffers (not the derived ones: rotary tables, scale rows)
    params = dict(model.state_dict(keep_vars=True))
    # the whole model's shapes (what the checkpoint holds) when this process holds a share
    whole = params
    if tp is not None:
        whole_model = Qwen35Model.on_meta(config, with_mtp=has_mtp, with_vision=has_vision)
        if kept_fp8:
            _swap_fp8_modules(whole_model, fp8_plan)
        whole = dict(whole_model.state_dict(keep_vars=True))
    sharder = Sharder(config.text, tp) if tp is not None else None
    scale_names = {v: k for k, v in fp8_plan.scale_of.items()}

    # Plan every tensor's destination and check shapes before reading any data.
    plan: dict[str, Target] = {}
    unexpected, misshapen = [], []
    filled: dict[str, set] = {}
    tied_head_skipped = False
    for n in names:
        t = target_of(n[: -len(".weight_scale_inv")] + ".weight" if n in scale_names else n)
        if t is not None and kept_fp8 and (n in fp8_plan.scale_of or n in scale_names):
            t = _fp8_target(t, "scale" if n in scale_names else "qweight")
        if t is not None and t.param == "lm_head.weight" and model.lm_head is None:
            tied_head_skipped = True  # a tied model's head is the embedding; a stored copy is redundant
            continue
        if t is None or t.param not in params:
            unexpected.append(n)
            continue
        full = tuple(whole[t.param].shape)
        if t.expert is None:
            expected = full
        elif t.part is None:
            expected = full[1:]
        else:
            expected = (full[1] // 2, full[2])
        found = shapes[n][0]
        if found != expected:
            misshapen.append(f"{n}: expected {list(expected)}, found {list(found)}")
            continue
        if t.expert is not None and t.expert >= full[0]:
            unexpected.append(f"{n} (expert {t.expert} >= num_experts {full[0]})")
            continue
        plan[n] = t
        key = (t.expert, t.part)
        if key in filled.setdefault(t.param, set()):
            misshapen.append(f"{n}: a second tensor for {t.param} {key}")
        filled[t.param].add(key)

    missing = []
    for pname, p in whole.items():
        got = filled.get(pname, set())
        if (None, None) in got:
            continue
        if _EXPERTS_GATE_UP.search(pname):
            want = {(e, part) for e in range(p.shape[0]) for part in (0, 1)}
        elif _EXPERTS_DOWN.search(pname):
            want = {(e, None) for e in range(p.shape[0])}
        else:
            want = {(None, None)}
        lack = want - got
        if lack:
            detail = "" if lack == {(None, None)} else f" (experts {sorted({e for e, _ in lack})[:8]}...)"
            missing.append(f"{pname}{detail}: expected {list(p.shape)}")
    if unexpected or misshapen or missing:
        parts = []
        if missing:
            parts.append("missing tensors:\n  " + "\n  ".join(missing[:50]))
        if unexpected:
            parts.append("unexpected tensors:\n  " + "\n  ".join(unexpected[:50]))
        if misshapen:
            parts.append("tensors with the wrong shape (config.json does not match the weights?):\n  "
                         + "\n  ".join(misshapen[:50]))
        raise CheckpointError("checkpoint does not match the model:\n" + "\n".join(parts))

    if sharder is not None:  # the experts other ranks hold are not read
        plan = {n: t for n, t in plan.items()
                if t.expert is None or sharder.expert_index(t.param, t.expert) is not None}
    total_bytes = sum(params[t.param].element_size() * _numel(shapes[n][0]) for n, t in plan.items())
    by_file: dict[Path, list[str]] = {}
    for n in plan:
        by_file.setdefault(files[n], []).append(n)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights",
               disable=not progress or total_bytes < _PROGRESS_MIN_BYTES)
    readers: dict[Path, SafetensorsReader] = {}
    try:
        with torch.no_grad():
            for path, tensor_names in by_file.items():
                f = readers.setdefault(path, SafetensorsReader(path))
                for n in tensor_names:
                    t = plan[n]
                    if sharder is not None:
                        if n in fp8_plan.scale_of and not kept_fp8:  # widened: its share times its scales' share
                            scale = fp8_plan.scale_of[n]
                            _widen_fp8_share(f, n, readers.setdefault(files[scale], SafetensorsReader(files[scale])),
                                             scale, t, params[t.param].data, sharder)
                        else:
                            _read_share(f, n, t, shapes[n][0], params[t.param].data, sharder)
                        bar.update(_numel(shapes[n][0]) * params[t.param].element_size())
                        continue
                    dst = params[t.param].data
                    if t.expert is not None:
                        dst = dst[t.expert]
                        if t.part is not None:
                            half = dst.shape[0] // 2
                            dst = dst[t.part * half:(t.part + 1) * half]
                    if n in fp8_plan.scale_of and not kept_fp8:
                        scale = fp8_plan.scale_of[n]
                        _widen_fp8_into(f, n, readers.setdefault(files[scale], SafetensorsReader(files[scale])),
                                        scale, shapes[scale][0], dst)
                    else:
                        f.read_into(n, dst)
                    bar.update(dst.numel() * dst.element_size())
    finally:
        for r in readers.values():
            r.close()
    bar.close()
    if fp8_plan.scale_of:
        how = "kept in 8 bits" if kept_fp8 else f"widened exactly to {dtype}"
        report.append(f"FP8 checkpoint: {len(fp8_plan.scale_of)} block-scaled e4m3 weights {how}")
    model.quantization = "fp8" if kept_fp8 else None
    if tied_head_skipped:
        report.append("lm_head.weight present but tie_word_embeddings is set: the embedding is used as the head")
    for line in report:
        log.info(line)
    model.load_report = report
    return model


_EXPERTS_GATE_UP = re.compile(r"experts\.gate_up_proj(_qweight|_scale)?$")
_EXPERTS_DOWN = re.compile(r"experts\.down_proj(_qweight|_scale)?$")


def _widen_fp8_into(f: SafetensorsReader, name: str, scale_reader: SafetensorsReader, scale_name: str,
                    scale_shape: tuple[int, ...], dst: torch.Tensor) -> None:
    """Read FP8 weight `name` and its scale; write q * scale (exact in fp32) into `dst`."""
    q = torch.empty(tuple(dst.shape), dtype=torch.float8_e4m3fn)
    f.read_into(name, q)
    scale = torch.empty(scale_shape, dtype=torch.float32)
    scale_reader.read_into(scale_name, scale)
    dst.copy_(FP8.dequantize({"qweight": q, "scale": scale, "srow": scale_rows([q.shape[0]])}, dst.dtype))


_SHARE_CHUNK_BYTES = 16 << 20  # column shares are read through row chunks of about this size


def _read_share(f: SafetensorsReader, name: str, t: Target, shape: tuple[int, ...], dst: torch.Tensor,
                sharder: Sharder) -> None:
    """Write this rank's share of checkpoint tensor `name` into `dst`, the rank's parameter `t.param`: row shares
    (and whole experts) read as just those rows; column shares through row chunks of ~16 MiB (never the whole
    tensor at once); one expert's tensor (per-expert checkpoints) whole, then cut."""
    if t.expert is None:
        _read_whole_share(f, name, t.param, shape, dst, sharder)
        return
    whole = torch.empty(shape, dtype=dst.dtype)
    f.read_into(name, whole)
    dst = dst[sharder.expert_index(t.param, t.expert)]
    if t.part is not None:
        half = dst.shape[0] // 2
        dst = dst[t.part * half:(t.part + 1) * half]
    dst.copy_(sharder.piece(t.param, whole, t.part, _block_of(t.param)))


def _block_of(param: str) -> int:
    """The block a stored tensor's entries stand for: a block-FP8 weight's scales hold one per 128 x 128 tile."""
    return BLOCK if param.endswith((".scale", "_scale")) else 1


def _widen_fp8_share(f: SafetensorsReader, name: str, scale_reader: SafetensorsReader, scale_name: str, t: Target,
                     dst: torch.Tensor, sharder: Sharder) -> None:
    """FP8 weight `name` widened into this rank's parameter: the share of its e4m3 values times the share of its
    tile scales (whole tiles: Sharder.block_cuts)."""
    q = torch.empty(f.shape(name), dtype=torch.float8_e4m3fn)
    f.read_into(name, q)
    scale = torch.empty(scale_reader.shape(scale_name), dtype=torch.float32)
    scale_reader.read_into(scale_name, scale)
    if t.expert is not None:
        dst = dst[sharder.expert_index(t.param, t.expert)]
        if t.part is not None:
            half = dst.shape[0] // 2
            dst = dst[t.part * half:(t.part + 1) * half]
    q = sharder.piece(t.param, q, t.part)
    scale = sharder.piece(t.param, scale, t.part, BLOCK)
    dst.copy_(FP8.dequantize({"qweight": q, "scale": scale, "srow": scale_rows([q.shape[0]])}, dst.dtype))


def _read_whole_share(f: SafetensorsReader, name: str, param: str, shape: tuple[int, ...], dst: torch.Tensor,
                      sharder: Sharder) -> None:
    fused = bool(_EXPERTS_GATE_UP.search(param) or _EXPERTS_DOWN.search(param))
    if fused and sharder.tp.expert_parallel:  # this rank's experts: rows of the expert dimension
        a, b = sharder.tp.part(shape[0])
        dst.copy_(f.read_rows(name, a, b))
        return
    cut = sharder.block_cuts(param, _block_of(param))
    if cut is None:
        f.read_into(name, dst)
        return
    dim, slices = cut
    lead = 2 if fused else 1  # fused experts [E, X, Y]: each expert's share, X cut as rows of [E*X, Y]
    X = shape[1] if fused else shape[0]
    experts = shape[0] if fused else 1
    if dim == 0:
        at = 0
        flat = dst.view(-1, *dst.shape[lead:])
        for e in range(experts):
            for s in slices:
                n = s.stop - s.start
                flat[at:at + n].copy_(f.read_rows(name, e * X + s.start, e * X + s.stop, lead))
                at += n
        return
    # a column share (row-parallel input columns): whole rows in chunks, the columns kept
    flat_dst = dst.view(-1, dst.shape[-1])
    rows = experts * X
    width = shape[-1]
    step = max(1, _SHARE_CHUNK_BYTES // max(1, width * dst.element_size()))
    for r in range(0, rows, step):
        chunk = f.read_rows(name, r, min(rows, r + step), lead)
        flat_dst[r:r + chunk.shape[0]].copy_(torch.cat([chunk[..., s] for s in slices], dim=-1))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
