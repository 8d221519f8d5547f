"""`load_model`: build a `Qwen35Model` from a checkpoint folder, a hub id, or (dummy) a preset."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qwen35.config import ConfigError, ModelConfig, find_preset
from qwen35.model import Qwen35Model
from qwen35.model.rope import MRotaryEmbedding
from qwen35.ops.hugepages import advise_hugepages, place_on_hugepages
from qwen35.ops.linear import fuse_projections
from qwen35.weights.dummy import init_dummy_weights
from qwen35.weights.hub import resolve_model_path
from qwen35.weights.names import Target, target_of
from qwen35.weights.safetensors_io import CheckpointError, SafetensorsReader, checkpoint_files, tensor_shapes

log = logging.getLogger("qwen35")

LOAD_FORMATS = ("auto", "safetensors", "dummy")
QUANTIZATIONS = (None, "int8")
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


def build_empty(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, with_mtp: bool,
                with_vision: bool) -> Qwen35Model:
    """The model with uninitialised storage on `device` (no time spent on random init)."""
    with torch.device("meta"):
        model = Qwen35Model(config, with_mtp=with_mtp, with_vision=with_vision)
    model = model.to(dtype).to_empty(device=device)
    for t in [*model.parameters(), *model.buffers()]:
        advise_hugepages(t)  # before the first write: the weights then fault in as 2 MiB pages (ops/hugepages.py)
    for m in model.modules():
        if isinstance(m, MRotaryEmbedding):
            m.reset_buffers()
    model.requires_grad_(False)  # an inference engine: no autograd bookkeeping anywhere
    return model.eval()


def load_model(path_or_id: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               load_format: str = "auto", seed: int = 0, progress: bool = True,
               quantization: str | None = None) -> Qwen35Model:
    """Load a Qwen3.5 model in eval mode.

    `path_or_id`: a checkpoint folder, a hub id (`Qwen/Qwen3.5-0.8B`), or with `load_format="dummy"` a
    preset name (`Qwen3.5-397B-A17B`) or a folder holding only `config.json`.
    `quantization="int8"`: weight-only int8 (per-row scales) for the linear layers after loading.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS}")
    model = _load(path_or_id, dtype, device, load_format, seed, progress)
    if quantization == "int8":
        from qwen35.ops.quant import quantize_int8

        quantize_int8(model)
    # one product per group of projections sharing an input (see ops/linear.py FusedLinears), then 2 MiB
    # pages for everything: decoding streams every weight per token (see ops/hugepages.py)
    fuse_projections(model)
    place_on_hugepages(model)
    return model


def _load(path_or_id, dtype, device, load_format, seed, progress) -> Qwen35Model:
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
        model = build_empty(config, dtype, device, with_mtp=config.text.mtp_num_hidden_layers > 0,
                            with_vision=config.vision is not None)
        if torch.device(device).type == "meta":
            model.load_report = ["meta device: shapes only, no storage (capacity planning)"]
        else:
            init_dummy_weights(model, seed=seed)
            model.load_report = ["dummy weights (random, seeded)"]
        return model
    folder = resolve_model_path(str(path_or_id), weights=True)
    config = ModelConfig.from_file(folder)
    if config.quantization is not None:
        raise ConfigError(f"{folder}: quantization_config.quant_method={config.quantization.get('quant_method')!r} "
                          "checkpoints are not supported yet (FP8 loading is a later issue)")
    files = checkpoint_files(folder)
    return load_weights(config, files, dtype, device, progress=progress)


def load_weights(config: ModelConfig, files: dict[str, Path], dtype: torch.dtype,
                 device: str | torch.device = "cpu", progress: bool = True) -> Qwen35Model:
    shapes = tensor_shapes(files)
    names = list(shapes)
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
    model = build_empty(config, dtype, device, with_mtp=has_mtp, with_vision=has_vision)
    params = dict(model.named_parameters())

    # Plan every tensor's destination and check shapes before reading any data.
    plan: dict[str, Target] = {}
    unexpected, misshapen = [], []
    filled: dict[str, set] = {}
    tied_head_skipped = False
    for n in names:
        t = target_of(n)
        if t is not None and t.param == "lm_head.weight" and model.lm_head is None:
            tied_head_skipped = True  # a tied model's head is the embedding; a stored copy is redundant
            continue
        if t is None or t.param not in params:
            unexpected.append(n)
            continue
        full = tuple(params[t.param].shape)
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
    for pname, p in params.items():
        got = filled.get(pname, set())
        if (None, None) in got:
            continue
        if pname.endswith("experts.gate_up_proj"):
            want = {(e, part) for e in range(p.shape[0]) for part in (0, 1)}
        elif pname.endswith("experts.down_proj"):
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

    total_bytes = sum(params[t.param].element_size() * _numel(shapes[n][0]) for n, t in plan.items())
    by_file: dict[Path, list[str]] = {}
    for n in plan:
        by_file.setdefault(files[n], []).append(n)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights",
               disable=not progress or total_bytes < _PROGRESS_MIN_BYTES)
    with torch.no_grad():
        for path, tensor_names in by_file.items():
            with SafetensorsReader(path) as f:
                for n in tensor_names:
                    t = plan[n]
                    dst = params[t.param].data
                    if t.expert is not None:
                        dst = dst[t.expert]
                        if t.part is not None:
                            half = dst.shape[0] // 2
                            dst = dst[t.part * half:(t.part + 1) * half]
                    f.read_into(n, dst)
                    bar.update(dst.numel() * dst.element_size())
    bar.close()
    if tied_head_skipped:
        report.append("lm_head.weight present but tie_word_embeddings is set: the embedding is used as the head")
    for line in report:
        log.info(line)
    model.load_report = report
    return model


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
