"""Image preprocessing for the Qwen3.5 vision encoder.

Follows the reference Qwen2-VL image processor (PIL backend) step for step, so that pixel values match it:

1. convert to RGB; images with an alpha band or a ``transparency`` entry are composited onto white first;
2. ``smart_resize``: height and width become multiples of ``patch_size * merge_size`` (32) with the pixel count in
   ``[min_pixels, max_pixels]``, aspect ratio kept as closely as possible; PIL bicubic resize on uint8;
3. rescale by 1/255 (in float64, stored as float32) and normalise ``(x - mean) / std`` in float32;
4. cut into 16x16 patches, each duplicated to ``temporal_patch_size`` frames.

Patch order (the vision encoder's 2x2 merge depends on it): rows are ordered by merge block (block row, then block
column), and inside a block by (row, column) of its ``merge_size x merge_size`` patches. Each row holds the values
in the order (channel, temporal frame, pixel row, pixel column): 3 * 2 * 16 * 16 = 1536 numbers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwen35.multimodal.media import MediaError, load_image

__all__ = [
    "IMAGE_PAD",
    "ImageProcessor",
    "expand_image_tokens",
    "num_image_tokens",
    "patchify",
    "smart_resize",
    "to_rgb_array",
]

IMAGE_PAD = "<|image_pad|>"

# Defaults of the Qwen3.5 checkpoints (preprocessor_config.json), used when a key is absent.
DEFAULT_MIN_PIXELS = 65536
DEFAULT_MAX_PIXELS = 16777216
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 32,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, pixel count in [min_pixels, max_pixels], same aspect ratio.

    Same arithmetic as the reference, including Python's round-half-to-even for the first guess.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size: height={height}, width={width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)} ({height}x{width})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _composite_rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    # The reference's array formula (float64 blend, rounded) — not PIL's integer alpha_composite, which can differ
    # by one level.
    alpha = rgba[..., 3:4] / 255
    blended = alpha * rgba[..., :3] + (1 - alpha) * 255
    return np.round(blended).astype(np.uint8)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Bring an array of any numeric dtype to uint8 with values 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"unsupported image array dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError("image array contains NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    # As the reference decides: whole numbers in 0..255 are pixel levels; other values in [0, 1] are fractions.
    if np.allclose(array, np.round(array)) and lo >= 0 and hi <= 255:
        return np.round(array).astype(np.uint8)
    if lo >= 0 and hi <= 1:
        # The reference truncates here and then rescales twice (its own warning case); rounding is the intent.
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    raise ValueError(f"image array values must lie in [0, 255] (levels) or [0, 1] (fractions), got [{lo}, {hi}]")


def to_rgb_array(image: Any) -> np.ndarray:
    """RGB uint8 array (H, W, 3) from a PIL image (any mode), a numpy array or a torch tensor.

    Arrays may be (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}; like the reference, a leading axis of size
    1, 3 or 4 is taken as the channel axis first. One channel is repeated to three, four are composited on white.
    """
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has zero size: {image.width}x{image.height}")
        try:
            has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
            if has_alpha:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                rgb = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ValueError(f"cannot convert PIL image of mode {image.mode!r} to RGB: {exc}") from exc
        return np.asarray(rgb)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"unsupported image type {type(image).__name__}")
    array = image
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"image array must have 2 or 3 dimensions, got shape {tuple(image.shape)}")
    if array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    elif array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot find the channel axis (1, 3 or 4 channels) in image of shape {tuple(image.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has zero size: shape {tuple(image.shape)}")
    array = _array_to_uint8(array)
    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        array = _composite_rgba_on_white(array)
    return np.ascontiguousarray(array)


def patchify(chw: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """Flatten one (C, H, W) image (any dtype) into rows of C*T*p*p in the reference order (see the module doc)."""
    channels, height, width = chw.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = chw.reshape(channels, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size,
                         patch_size)
    # -> (block_row, block_col, row_in_block, col_in_block, channel, pixel_row, pixel_col)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)
    # The still image is repeated over the temporal axis, which sits between channel and pixel rows.
    blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal_patch_size, *blocks.shape[5:]))
    rows = blocks.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    # The reshape almost always copies; when it can return a (read-only, broadcast) view, copy so callers own it.
    return rows if rows.flags.writeable and rows.flags.c_contiguous else rows.copy()


def _grid_rows(grid_thw: Any) -> list[tuple[int, int, int]]:
    """Normalise one grid (3 numbers) or several ([n, 3]) into a list of int triples."""
    if isinstance(grid_thw, torch.Tensor):
        grid_thw = grid_thw.tolist()
    elif isinstance(grid_thw, np.ndarray):
        grid_thw = grid_thw.tolist()
    grid_thw = list(grid_thw)
    if len(grid_thw) == 3 and all(isinstance(x, (int, np.integer)) for x in grid_thw):
        grid_thw = [grid_thw]
    rows = []
    for row in grid_thw:
        row = list(row)
        if len(row) != 3:
            raise ValueError(f"grid_thw rows must have 3 entries (t, h, w), got {row}")
        rows.append((int(row[0]), int(row[1]), int(row[2])))
    return rows


def num_image_tokens(grid_thw: Any, merge_size: int = 2) -> int:
    """Placeholder tokens for one image: ``t * h * w / merge_size**2`` (``grid_thw`` = one (t, h, w) triple)."""
    rows = _grid_rows(grid_thw)
    if len(rows) != 1:
        raise ValueError(f"num_image_tokens takes one (t, h, w) grid, got {len(rows)}")
    t, h, w = rows[0]
    return t * h * w // (merge_size * merge_size)


def expand_image_tokens(text: str, image_grid_thw: Any, merge_size: int = 2, image_token: str = IMAGE_PAD) -> str:
    """Replace the i-th ``<|image_pad|>`` in ``text`` by ``num_image_tokens(grid_i)`` copies of it.

    The surrounding ``<|vision_start|>`` / ``<|vision_end|>`` written by the chat template stay as they are.
    """
    rows = _grid_rows(image_grid_thw) if len(image_grid_thw) else []
    found = text.count(image_token)
    if found != len(rows):
        raise ValueError(f"prompt has {found} {image_token} placeholders but {len(rows)} images were given")
    counts = iter(num_image_tokens(row, merge_size) for row in rows)
    return re.sub(re.escape(image_token), lambda _m: image_token * next(counts), text)


def _read_json(folder: str | os.PathLike[str], name: str) -> dict[str, Any]:
    if not os.path.isdir(folder):
        raise ValueError(f"not a directory: {folder}")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _pixel_limits(config: dict[str, Any], default_min: int, default_max: int) -> tuple[int, int]:
    """min/max pixels from ``size`` (shortest_edge / longest_edge, or legacy keys) with top-level overrides."""
    size = config.get("size") or {}
    min_pixels = size.get("shortest_edge", size.get("min_pixels", default_min))
    max_pixels = size.get("longest_edge", size.get("max_pixels", default_max))
    # Top-level min_pixels / max_pixels win, as in the reference constructor.
    if config.get("min_pixels") is not None:
        min_pixels = config["min_pixels"]
    if config.get("max_pixels") is not None:
        max_pixels = config["max_pixels"]
    return int(min_pixels), int(max_pixels)


@dataclass
class VisionGeometry:
    """Sizes shared by the image and video processors."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    def validate(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class ImageProcessor:
    """Turns images into ``pixel_values`` rows and ``image_grid_thw`` for the vision encoder."""

    def __init__(
        self,
        *,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
    ) -> None:
        self.geometry = VisionGeometry(int(patch_size), int(temporal_patch_size), int(merge_size))
        self.geometry.validate()
        if min_pixels <= 0 or max_pixels < min_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        if len(image_mean) != 3 or len(image_std) != 3 or any(s == 0 for s in image_std):
            raise ValueError(f"image_mean and image_std need 3 values (std non-zero): {image_mean}, {image_std}")
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.rescale_factor = float(rescale_factor)

    @property
    def patch_size(self) -> int:
        return self.geometry.patch_size

    @property
    def temporal_patch_size(self) -> int:
        return self.geometry.temporal_patch_size

    @property
    def merge_size(self) -> int:
        return self.geometry.merge_size

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> ImageProcessor:
        """Build from the dict of a ``preprocessor_config.json``; missing keys take the Qwen3.5 defaults."""
        min_pixels, max_pixels = _pixel_limits(config, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
        kwargs: dict[str, Any] = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], **overrides: Any) -> ImageProcessor:
        """Read ``preprocessor_config.json`` in ``folder`` (defaults when the file is absent)."""
        return cls.from_config(_read_json(folder, "preprocessor_config.json"), **overrides)

    def target_size(self, height: int, width: int, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> tuple[int, int]:
        """Resized (height, width) for an image of the given size."""
        return smart_resize(height, width, self.geometry.factor,
                            self.min_pixels if min_pixels is None else int(min_pixels),
                            self.max_pixels if max_pixels is None else int(max_pixels))

    def grid_thw(self, height: int, width: int, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int, int]:
        """(t, h, w) patch grid for an image of the given size, without touching pixels."""
        h, w = self.target_size(height, width, min_pixels, max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, grid_thw: Any) -> int:
        """``t * h * w / merge_size**2`` placeholder tokens for one image."""
        return num_image_tokens(grid_thw, self.merge_size)

    def expand_prompt(self, text: str, image_grid_thw: Any) -> str:
        """Expand each ``<|image_pad|>`` to its image's token count (see :func:`expand_image_tokens`)."""
        return expand_image_tokens(text, image_grid_thw, self.merge_size)

    def _lookup_table(self) -> np.ndarray:
        """float32 [3, 256]: the normalised value of every uint8 level in every channel.

        Computed with the reference's arithmetic (float64 rescale, float32 storage, float32 ``(x - mean) / std``), so
        looking values up gives bit-identical results while skipping a float64 pass over large images.
        """
        levels = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        return (levels[None, :] - mean) / std

    def process_one(self, image: Any, *, min_pixels: int | None = None, max_pixels: int | None = None,
                    allow_remote: bool = False) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Patches (float32 [h*w, patch_dim]) and grid (1, h, w) of one image from any accepted source."""
        if not isinstance(image, (np.ndarray, torch.Tensor)):
            image = load_image(image, allow_remote=allow_remote)
        rgb = to_rgb_array(image)
        height, width = rgb.shape[:2]
        new_h, new_w = self.target_size(height, width, min_pixels, max_pixels)
        resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
        # Map uint8 levels to normalised floats by table (one gather per value), then cut into patches.
        normalised = self._lookup_table()[np.arange(3)[:, None, None], resized.transpose(2, 0, 1)]
        patches = patchify(normalised, self.patch_size, self.merge_size, self.temporal_patch_size)
        return patches, (1, new_h // self.patch_size, new_w // self.patch_size)

    def __call__(self, images: Any, *, min_pixels: int | None = None, max_pixels: int | None = None,
                 allow_remote: bool = False) -> dict[str, torch.Tensor]:
        """Preprocess one image or a list of images.

        Each image may be a PIL image, numpy array / torch tensor (HW, HWC or CHW), file path, ``bytes``,
        ``data:`` URL, or an ``http(s)://`` URL when ``allow_remote`` is true.

        Returns ``pixel_values`` float32 [sum of h*w over images, 3*T*p*p] and ``image_grid_thw`` int64 [n, 3].
        """
        if isinstance(images, (list, tuple)):
            items = list(images)
            if not items:
                raise ValueError("no images given")
        else:
            items = [images]
        all_patches, grids = [], []
        for index, image in enumerate(items):
            try:
                patches, grid = self.process_one(image, min_pixels=min_pixels, max_pixels=max_pixels,
                                                 allow_remote=allow_remote)
            except ValueError as exc:
                # Name the failing item; keep MediaError recognisable for callers that map it to a 4xx answer.
                raise (MediaError if isinstance(exc, MediaError) else ValueError)(f"image {index}: {exc}") from exc
            all_patches.append(patches)
            grids.append(grid)
        # A single image needs no concatenation copy (its patches can be hundreds of MB).
        pixel_values = all_patches[0] if len(all_patches) == 1 else np.concatenate(all_patches, axis=0)
        return {
            "pixel_values": torch.from_numpy(pixel_values),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        }
