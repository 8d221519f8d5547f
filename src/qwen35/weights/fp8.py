"""Official block-FP8 checkpoints (`quantization_config.quant_method "fp8"`): what is quantised, checked up front.

Every converted `X.weight` is `F8_E4M3` with `X.weight_scale_inv` [ceil(N/128), ceil(K/128)] (BF16, F16 or F32),
a multiplier per 128x128 tile; the modules of `modules_to_not_convert` stay BF16. The list names modules with
the checkpoint's prefix (`model.language_model.layers.0...`): it is matched after mapping both sides to our
parameter names, so a text-only (CausalLM) layout matches it too. Every check runs before any data is read, so
a bad checkpoint leaves nothing half-loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qwen35.config import ConfigError
from qwen35.weights.names import param_name
from qwen35.weights.safetensors_io import CheckpointError

FP8_DTYPE = "F8_E4M3"
SCALE_DTYPES = ("BF16", "F16", "F32")
SCALE_SUFFIX = ".weight_scale_inv"
BLOCK = 128
_FORMATS = (None, "e4m3", "float8_e4m3fn")


@dataclass
class FP8Spec:
    """A validated `quantization_config` of an FP8 checkpoint."""

    not_converted: set[str] = field(default_factory=set)  # our module names (see names.param_name)

    @classmethod
    def from_config(cls, quant: dict) -> FP8Spec:
        where = "config.json quantization_config"
        method = quant.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"{where}.quant_method={method!r} is not supported (only 'fp8')")
        fmt = quant.get("fmt")
        if fmt not in _FORMATS:
            raise ConfigError(f"{where}.fmt={fmt!r} is not supported: expected 'e4m3' (float8_e4m3fn)")
        scheme = quant.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ConfigError(f"{where}.activation_scheme={scheme!r} is not supported: expected 'dynamic' "
                              "(static activation scales are not read)")
        block = quant.get("weight_block_size")
        if block is None or list(block) != [BLOCK, BLOCK]:
            raise ConfigError(f"{where}.weight_block_size={block!r} is not supported: expected [128, 128] "
                              "(per-tensor and other block sizes are not read)")
        for key in ("weight_per_tensor", "act_per_tensor"):
            if quant.get(key):
                raise ConfigError(f"{where}.{key}=true is not supported (block scales only)")
        raw = quant.get("modules_to_not_convert") or []
        if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
            raise ConfigError(f"{where}.modules_to_not_convert must be a list of module names")
        mapped = set()
        for m in raw:
            ours = param_name(m)
            mapped.add(ours if ours is not None else m)
        return cls(mapped)

    def converted(self, module: str) -> bool:
        """May this module (our name) hold FP8 weights?"""
        return module not in self.not_converted


@dataclass
class FP8Plan:
    """Which checkpoint weights are FP8, each with its scale tensor's name."""

    scale_of: dict[str, str]  # FP8 weight name -> its scale name (checkpoint names)

    @property
    def scales(self) -> set[str]:
        return set(self.scale_of.values())


def plan_fp8(shapes: dict[str, tuple[tuple[int, ...], str]], spec: FP8Spec | None) -> FP8Plan:
    """Check every FP8 weight and scale of a checkpoint (names -> (shape, dtype)); raise naming each bad one."""
    problems: list[str] = []
    scale_of: dict[str, str] = {}
    for name, (shape, dtype) in shapes.items():
        if dtype != FP8_DTYPE:
            continue
        if spec is None:
            problems.append(f"{name}: {FP8_DTYPE} tensor, but config.json has no FP8 quantization_config")
            continue
        if not name.endswith(".weight") or len(shape) != 2:
            problems.append(f"{name}: {FP8_DTYPE} tensor {list(shape)} is not a 2-D .weight")
            continue
        module = name[: -len(".weight")]
        ours = param_name(module) or module
        if not spec.converted(ours):
            problems.append(f"{name}: {FP8_DTYPE}, but {module} is listed in modules_to_not_convert")
            continue
        scale = module + SCALE_SUFFIX
        if scale not in shapes:
            problems.append(f"{name}: {FP8_DTYPE} weight without its scale {scale}")
            continue
        s_shape, s_dtype = shapes[scale]
        want = [math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)]
        if list(s_shape) != want:
            problems.append(f"{scale}: shape {list(s_shape)}, expected {want} for a {list(shape)} weight "
                            "in 128x128 blocks")
            continue
        if s_dtype not in SCALE_DTYPES:
            problems.append(f"{scale}: dtype {s_dtype}, expected one of {', '.join(SCALE_DTYPES)}")
            continue
        scale_of[name] = scale
    for name in shapes:
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] + ".weight" not in scale_of:
            weight = name[: -len(SCALE_SUFFIX)] + ".weight"
            if weight not in shapes:
                problems.append(f"{name}: a scale without its weight {weight}")
            elif shapes[weight][1] != FP8_DTYPE:
                problems.append(f"{name}: a scale for {weight}, which is {shapes[weight][1]}, not {FP8_DTYPE}")
        elif name.endswith((".input_scale", ".activation_scale")):
            problems.append(f"{name}: static activation scales are not supported")
    if problems:
        raise CheckpointError("FP8 checkpoint is malformed:\n  " + "\n  ".join(problems[:50]))
    return FP8Plan(scale_of)
