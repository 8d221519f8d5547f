"""Video preprocessing for the Qwen3.5 vision encoder, following the reference Qwen3-VL video processor.

Pipeline for one video:

1. frames: decoded with PyAV (``rgb24``), or given as a list / array of frames with their frame rate;
2. sampling (the reference definition): ``n = int(total_frames / video_fps * fps)`` clamped to
   ``[min_frames, max_frames]`` and to ``total_frames``; indices ``linspace(0, total - 1, n)`` rounded;
3. resize: one size for the whole clip from a video ``smart_resize`` whose pixel budget ``[min_pixels, max_pixels]``
   counts every sampled frame (``t * h * w``), so the per-frame maximum is ``max_pixels / n``; with
   ``cap_pixels_per_frame`` each frame is further capped at ``max_video_tokens`` merged tokens, as the reference's
   opt-in switch does. Bicubic with antialiasing on uint8, as torchvision does on CPU (``torch`` interpolate);
4. rescale and normalise ``(x - 255 * mean) / (255 * std)`` in float32 (the reference's fused form);
5. an odd frame count is made even by repeating the last frame; patches are cut like images (see ``image.py``),
   with real temporal pairs instead of a duplicated frame. Rows are ordered (temporal patch, block row, block
   column, row in block, column in block), each row (channel, frame in pair, pixel row, pixel column).

The timestamp of temporal patch k is the mean of its two frames' times ``index / video_fps``; the prompt shows it
as ``<{t:.1f} seconds>`` before that patch's ``<|vision_start|>`` ... ``<|vision_end|>`` group.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwen35.multimodal.image import VisionGeometry, _grid_rows, _pixel_limits, _read_json, to_rgb_array
from qwen35.multimodal.media import MediaError, open_video_source

__all__ = [
    "VIDEO_PAD",
    "VISION_END",
    "VISION_START",
    "VideoProcessor",
    "decode_video",
    "expand_video_tokens",
    "frame_timestamps",
    "sample_frame_indices",
    "smart_resize_video",
]

VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# Defaults of the Qwen3.5 checkpoints (video_preprocessor_config.json and the reference class).
DEFAULT_MIN_PIXELS = 4096
DEFAULT_MAX_PIXELS = 25165824
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768
DEFAULT_MAX_VIDEO_TOKENS = 768
# The reference assumes this rate when a video's frame rate is unknown.
FALLBACK_VIDEO_FPS = 24.0


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    *,
    temporal_factor: int = 2,
    factor: int = 32,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Frame (height, width) for a clip of ``num_frames`` frames: multiples of ``factor``, ``t*h*w`` in budget."""
    if num_frames < temporal_factor:
        raise ValueError(f"need at least {temporal_factor} frames, got {num_frames}")
    if height <= 0 or width <= 0:
        raise ValueError(f"video frames have zero size: height={height}, width={width}")
    if height < factor or width < factor:
        # Tiny frames are first scaled up so the short side reaches one factor (int() truncation as the reference).
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_frame_indices(
    total_frames: int,
    video_fps: float | None,
    *,
    fps: float | None = DEFAULT_FPS,
    num_frames: int | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> np.ndarray:
    """Indices (int64) of the frames to keep, by the reference rule.

    With ``num_frames`` that many frames are spread evenly (``fps`` is then ignored); otherwise
    ``int(total_frames / video_fps * fps)`` frames, clamped to ``[min_frames, max_frames]`` and to ``total_frames``.
    """
    if total_frames <= 0:
        raise ValueError("video has no frames")
    if num_frames is None:
        if fps is None or fps <= 0:
            raise ValueError(f"sampling fps must be positive, got {fps}")
        source_fps = float(video_fps) if video_fps else FALLBACK_VIDEO_FPS
        num_frames = int(total_frames / source_fps * fps)
        num_frames = min(max(num_frames, min_frames), max_frames, total_frames)
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return np.linspace(0, total_frames - 1, num_frames).round().astype(np.int64)


def frame_timestamps(indices: Sequence[int], video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame (``index / video_fps``).

    The index list is padded with its last entry to a multiple of ``temporal_patch_size``, as the frames are.
    """
    indices = [int(i) for i in indices]
    if not indices:
        return []
    if len(indices) % temporal_patch_size:
        indices += [indices[-1]] * (temporal_patch_size - len(indices) % temporal_patch_size)
    times = [i / video_fps for i in indices]
    return [(times[k] + times[k + temporal_patch_size - 1]) / 2 for k in range(0, len(times), temporal_patch_size)]


def _resize_frame(rgb: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(3, height, width) uint8: bicubic with antialiasing on uint8, what torchvision's resize runs on CPU."""
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # arrays viewing PIL memory are read-only; torch wants to own writable memory
        rgb = rgb.copy()
    frame = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    if frame.shape[1:] == (height, width):
        return frame
    out = torch.nn.functional.interpolate(frame[None], size=(height, width), mode="bicubic", align_corners=False,
                                          antialias=True)
    return out[0]


def decode_video(
    source: Any,
    choose_indices: Callable[[int, float | None], np.ndarray],
    *,
    frame_transform: Callable[[np.ndarray, int], Any] | None = None,
    allow_remote: bool = False,
) -> tuple[list[Any], np.ndarray, float | None, int]:
    """Decode the frames picked by ``choose_indices(total_frames, video_fps)`` from a video file or bytes.

    Returns (frames, indices, video_fps, total_frames); each frame is an RGB uint8 (H, W, 3) array, or whatever
    ``frame_transform(rgb, n_indices)`` makes of it (used to resize right away, so long clips never hold all
    full-size frames in memory). Frames are counted by their order of decoding, as the reference does; the
    container's frame count is used when it has one, else the video packets are counted (webm stores none).
    """
    import av  # PyAV is needed only for files; frame lists work without it

    opened = open_video_source(source, allow_remote=allow_remote)

    def _open() -> Any:
        if hasattr(opened, "seek"):
            opened.seek(0)
        return av.open(opened, mode="r")

    try:
        with _open() as container:
            if not container.streams.video:
                raise ValueError("the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else None
            total = int(stream.frames or 0)
            if total <= 0:
                total = sum(1 for packet in container.demux(stream) if packet.size)
        if total <= 0:
            raise ValueError("the video stream holds no frames")
        indices = np.asarray(choose_indices(total, video_fps), dtype=np.int64)
        wanted: dict[int, list[int]] = {}
        for position, index in enumerate(indices.tolist()):
            wanted.setdefault(index, []).append(position)
        frames: list[Any] = [None] * len(indices)
        last_index = int(indices.max())
        last_frame: Any = None
        with _open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame-parallel decoding; the frames come out in the same order
            for i, frame in enumerate(container.decode(stream)):
                if i > last_index:
                    break
                if i in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    item = frame_transform(rgb, len(indices)) if frame_transform else rgb
                    for position in wanted[i]:
                        frames[position] = item
                    last_frame = item
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot decode video: {exc}") from exc
    if last_frame is None:
        raise ValueError("no frame could be decoded from the video")
    # The container may promise more frames than it decodes; the missing tail repeats the last decoded frame.
    frames = [last_frame if f is None else f for f in frames]
    return frames, indices, video_fps, total


def expand_video_tokens(
    text: str,
    video_grid_thw: Any,
    video_timestamps: Sequence[Sequence[float]],
    merge_size: int = 2,
) -> str:
    """Expand each video placeholder of ``text`` into its per-temporal-patch groups.

    The i-th ``<|vision_start|><|video_pad|><|vision_end|>`` (or a bare ``<|video_pad|>``) becomes, for every
    temporal patch k of video i, ``<{t_k:.1f} seconds><|vision_start|>`` + ``<|video_pad|>`` x (h*w/merge^2) +
    ``<|vision_end|>``. This is the official Qwen3-VL text (transformers 4.57 and vLLM); transformers 5.x replaces
    only the bare ``<|video_pad|>`` and so nests the groups inside the template's own start/end pair.
    """
    rows = _grid_rows(video_grid_thw) if len(video_grid_thw) else []
    if len(video_timestamps) != len(rows):
        raise ValueError(f"{len(rows)} video grids but {len(video_timestamps)} timestamp lists")
    pattern = re.escape(VISION_START + VIDEO_PAD + VISION_END) + "|" + re.escape(VIDEO_PAD)
    found = len(re.findall(pattern, text))
    if found != len(rows):
        raise ValueError(f"prompt has {found} video placeholders but {len(rows)} videos were given")
    replacements = []
    for (t, h, w), stamps in zip(rows, video_timestamps, strict=True):
        if len(stamps) != t:
            raise ValueError(f"video with {t} temporal patches has {len(stamps)} timestamps")
        group = VISION_START + VIDEO_PAD * (h * w // (merge_size * merge_size)) + VISION_END
        replacements.append("".join(f"<{s:.1f} seconds>" + group for s in stamps))
    it = iter(replacements)
    return re.sub(pattern, lambda _m: next(it), text)


def _frames_from_array(video: Any) -> list[np.ndarray]:
    """Split a (T, H, W, C) / (T, C, H, W) array or tensor into frames."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if video.ndim != 4:
        raise ValueError(f"a video array must be 4-D (frames, ...), got shape {tuple(video.shape)}")
    return list(video)


def _is_frame(item: Any) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3))


class VideoProcessor:
    """Turns videos into ``pixel_values_videos`` rows, ``video_grid_thw`` and per-temporal-patch timestamps."""

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
        fps: float = DEFAULT_FPS,
        min_frames: int = DEFAULT_MIN_FRAMES,
        max_frames: int = DEFAULT_MAX_FRAMES,
        cap_pixels_per_frame: bool = False,
        max_video_tokens: int = DEFAULT_MAX_VIDEO_TOKENS,
    ) -> None:
        self.geometry = VisionGeometry(int(patch_size), int(temporal_patch_size), int(merge_size))
        self.geometry.validate()
        if min_pixels <= 0 or max_pixels < min_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        if not 0 < min_frames <= max_frames:
            raise ValueError(f"need 0 < min_frames <= max_frames, got {min_frames}, {max_frames}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if len(image_mean) != 3 or len(image_std) != 3 or any(s == 0 for s in image_std):
            raise ValueError(f"image_mean and image_std need 3 values (std non-zero): {image_mean}, {image_std}")
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.rescale_factor = float(rescale_factor)
        self.fps = float(fps)
        self.min_frames = int(min_frames)
        self.max_frames = int(max_frames)
        # Off by default, as in the reference (transformers 5.24): the budget is shared by all sampled frames.
        self.cap_pixels_per_frame = bool(cap_pixels_per_frame)
        self.max_video_tokens = int(max_video_tokens)

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
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> VideoProcessor:
        """Build from the dict of a ``video_preprocessor_config.json``; missing keys take the Qwen3.5 defaults."""
        min_pixels, max_pixels = _pixel_limits(config, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
        kwargs: dict[str, Any] = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor",
                    "fps", "min_frames", "max_frames", "cap_pixels_per_frame", "max_video_tokens"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], **overrides: Any) -> VideoProcessor:
        """Read ``video_preprocessor_config.json`` in ``folder`` (defaults when the file is absent)."""
        return cls.from_config(_read_json(folder, "video_preprocessor_config.json"), **overrides)

    # -- pieces -------------------------------------------------------------------------------------------------

    def sample_indices(self, total_frames: int, video_fps: float | None, *, fps: float | None = None,
                       num_frames: int | None = None) -> np.ndarray:
        """Frame indices to keep (see :func:`sample_frame_indices`), with this processor's defaults."""
        return sample_frame_indices(total_frames, video_fps, fps=self.fps if fps is None else fps,
                                    num_frames=num_frames, min_frames=self.min_frames, max_frames=self.max_frames)

    def target_size(self, num_frames: int, height: int, width: int, *, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> tuple[int, int]:
        """Frame (height, width) after resizing a clip of ``num_frames`` sampled frames."""
        min_pixels = self.min_pixels if min_pixels is None else int(min_pixels)
        max_pixels = self.max_pixels if max_pixels is None else int(max_pixels)
        # A one-frame clip is padded to a pair before sizing (the reference refuses it instead).
        num_frames = max(num_frames, self.temporal_patch_size)
        factor = self.geometry.factor
        if self.cap_pixels_per_frame:
            frame_cap = self.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, max_pixels // num_frames), int(min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize_video(num_frames, height, width, temporal_factor=self.temporal_patch_size, factor=factor,
                                  min_pixels=min_pixels, max_pixels=max_pixels)

    def _patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(T, 3, H, W) float32 -> rows [t*h*w, patch_dim] and grid (t, h, w); T is padded to a multiple of 2."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -frames.shape[0] % tp:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        n, c, height, width = frames.shape
        gt, gh, gw = n // tp, height // p, width // p
        x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        # -> (temporal patch, block row, block col, row in block, col in block, channel, frame in pair, px row, px col)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)

    def _normalise(self, frames: torch.Tensor) -> torch.Tensor:
        # Reference fused form: (x - mean / rescale) / (std / rescale) on float32 values 0..255.
        mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
        return (frames.to(torch.float32) - mean[:, None, None]) / std[:, None, None]

    def _encode(self, resized: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int, int]]:
        return self._patchify(self._normalise(torch.stack(resized)))

    # -- public -------------------------------------------------------------------------------------------------

    def process_frames(
        self,
        frames: Any,
        frames_fps: float | None,
        *,
        do_sample_frames: bool = True,
        fps: float | None = None,
        num_frames: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> dict[str, Any]:
        """One video given as frames (list of PIL images / arrays, or a 4-D array) shot at ``frames_fps``.

        With ``do_sample_frames`` the frames are treated as the whole decoded video and sampled exactly as a file
        would be; without it they are taken as already sampled (indices 0..n-1 at ``frames_fps``).
        """
        if frames_fps is None or not frames_fps > 0:
            raise ValueError("frames given without their frame rate: pass frames_fps (frames per second) > 0")
        items = _frames_from_array(frames) if isinstance(frames, (np.ndarray, torch.Tensor)) else list(frames)
        if not items:
            raise ValueError("video has no frames")
        if do_sample_frames:
            indices = self.sample_indices(len(items), frames_fps, fps=fps, num_frames=num_frames)
        else:
            indices = np.arange(len(items), dtype=np.int64)
        rgb = [to_rgb_array(items[i]) for i in indices.tolist()]
        if len({f.shape for f in rgb}) != 1:
            raise ValueError(f"video frames differ in size: {sorted({f.shape[:2] for f in rgb})}")
        height, width = rgb[0].shape[:2]
        new_h, new_w = self.target_size(len(rgb), height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        pixels, grid = self._encode([_resize_frame(f, new_h, new_w) for f in rgb])
        return self._result(pixels, grid, indices, float(frames_fps), len(items))

    def process_file(
        self,
        source: Any,
        *,
        fps: float | None = None,
        num_frames: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        allow_remote: bool = False,
    ) -> dict[str, Any]:
        """One video file (path, bytes, ``data:`` URL, file object, or http(s) URL when allowed), via PyAV."""
        size: dict[str, tuple[int, int]] = {}

        def choose(total: int, video_fps: float | None) -> np.ndarray:
            return self.sample_indices(total, video_fps, fps=fps, num_frames=num_frames)

        def resize(rgb: np.ndarray, n_sampled: int) -> torch.Tensor:
            # The clip's size is fixed by its first sampled frame and the number of sampled frames.
            if "hw" not in size:
                size["hw"] = self.target_size(n_sampled, rgb.shape[0], rgb.shape[1], min_pixels=min_pixels,
                                              max_pixels=max_pixels)
            return _resize_frame(rgb, *size["hw"])

        frames, indices, video_fps, total = decode_video(source, choose, frame_transform=resize,
                                                         allow_remote=allow_remote)
        pixels, grid = self._encode(frames)
        return self._result(pixels, grid, indices, video_fps if video_fps else FALLBACK_VIDEO_FPS, total)

    def _result(self, pixels: torch.Tensor, grid: tuple[int, int, int], indices: np.ndarray, video_fps: float,
                total: int) -> dict[str, Any]:
        return {
            "pixel_values": pixels,
            "grid_thw": grid,
            "timestamps": frame_timestamps(indices.tolist(), video_fps, self.temporal_patch_size),
            "frame_indices": indices.tolist(),
            "video_fps": video_fps,
            "total_frames": total,
        }

    def __call__(
        self,
        videos: Any,
        *,
        frames_fps: float | Sequence[float | None] | None = None,
        do_sample_frames: bool = True,
        fps: float | None = None,
        num_frames: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        allow_remote: bool = False,
    ) -> dict[str, Any]:
        """Preprocess one video or a list of videos.

        A video is a file source (path, ``bytes``, ``data:`` URL, file object, http(s) URL with ``allow_remote``)
        or its frames (a list of PIL images / arrays, or a (T, H, W, C) array) together with ``frames_fps`` (one
        number, or one per video). ``fps`` / ``num_frames`` override the sampling (2 frames per second).

        Returns ``pixel_values_videos`` float32 [sum of t*h*w, 3*2*16*16], ``video_grid_thw`` int64 [n, 3],
        ``video_timestamps`` (list per video of grid_t floats, seconds), ``video_frame_indices`` (sampled frame
        indices per video, before the even-count padding) and ``video_fps`` (source frame rate per video).
        """
        if isinstance(videos, (list, tuple)) and videos and _is_frame(videos[0]):
            batch = [videos]  # one video given as a list of frames
        elif isinstance(videos, (list, tuple)):
            batch = list(videos)
        else:
            batch = [videos]
        if not batch:
            raise ValueError("no videos given")
        if isinstance(frames_fps, (list, tuple)):
            if len(frames_fps) != len(batch):
                raise ValueError(f"{len(frames_fps)} frames_fps values for {len(batch)} videos")
            rates = list(frames_fps)
        else:
            rates = [frames_fps] * len(batch)
        results = []
        for index, (video, rate) in enumerate(zip(batch, rates, strict=True)):
            try:
                if isinstance(video, (list, tuple, np.ndarray, torch.Tensor)):
                    results.append(self.process_frames(video, rate, do_sample_frames=do_sample_frames, fps=fps,
                                                       num_frames=num_frames, min_pixels=min_pixels,
                                                       max_pixels=max_pixels))
                else:
                    results.append(self.process_file(video, fps=fps, num_frames=num_frames, min_pixels=min_pixels,
                                                     max_pixels=max_pixels, allow_remote=allow_remote))
            except ValueError as exc:
                # Name the failing item; keep MediaError recognisable for callers that map it to a 4xx answer.
                raise (MediaError if isinstance(exc, MediaError) else ValueError)(f"video {index}: {exc}") from exc
        return {
            "pixel_values_videos": torch.cat([r["pixel_values"] for r in results], dim=0),
            "video_grid_thw": torch.tensor([r["grid_thw"] for r in results], dtype=torch.long),
            "video_timestamps": [r["timestamps"] for r in results],
            "video_frame_indices": [r["frame_indices"] for r in results],
            "video_fps": [r["video_fps"] for r in results],
        }

    def num_video_tokens(self, grid_thw: Any) -> int:
        """Pad tokens of one video: ``t * h * w / merge_size**2`` (timestamps and start/end tokens not counted)."""
        rows = _grid_rows(grid_thw)
        if len(rows) != 1:
            raise ValueError(f"num_video_tokens takes one (t, h, w) grid, got {len(rows)}")
        t, h, w = rows[0]
        return t * h * w // (self.merge_size * self.merge_size)

    def expand_prompt(self, text: str, outputs: dict[str, Any]) -> str:
        """Expand the video placeholders of ``text`` with the grids and timestamps of ``outputs`` (of __call__)."""
        return expand_video_tokens(text, outputs["video_grid_thw"], outputs["video_timestamps"], self.merge_size)
