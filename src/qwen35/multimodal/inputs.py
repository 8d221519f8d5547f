"""From a prompt with images / videos to what the engine feeds the model.

`MultimodalProcessor.prepare(text, images, videos)` runs the processors, expands each placeholder of the
rendered prompt into its pad tokens, tokenises, and returns the token ids with a `MultimodalPrompt`: the
pixel tensors, the M-RoPE positions of the prompt, the offset for generated tokens, and for every prompt
position the row of the vision features it takes (-1 for text).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen35.config import ModelConfig
from qwen35.multimodal.image import ImageProcessor, expand_image_tokens
from qwen35.multimodal.positions import mrope_positions
from qwen35.multimodal.video import VideoProcessor, expand_video_tokens


@dataclass
class MultimodalPrompt:
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    positions: torch.Tensor  # [3, prompt_len] M-RoPE positions
    delta: int  # generated token i (absolute index) sits at position i + delta
    feature_index: torch.Tensor  # [prompt_len] row of the features (images first, then videos), -1 for text
    merge: int = 2  # the vision tower's spatial merge: patches per feature row = merge ** 2
    _cache_tokens: list[int] | None = field(default=None, init=False, repr=False)

    def cache_tokens(self, ids: list[int]) -> list[int]:
        """The prompt's ids for the prefix cache's keys: each placeholder token replaced by a number made of its
        image's (or video's) content and its place in it, so equal keys mean equal pictures too. (Negative:
        never a real token id. Python's hash: the keys live only in this process.)"""
        if self._cache_tokens is None:
            out = list(ids)
            items = self._item_digests()
            index = self.feature_index.tolist()
            for i, r in enumerate(index):
                if r >= 0:
                    start, digest = max((it for it in items if it[0] <= r), key=lambda it: it[0])
                    out[i] = -1 - (hash((digest, r - start)) & ((1 << 62) - 1))
            self._cache_tokens = out
        return self._cache_tokens

    def _item_digests(self) -> list[tuple[int, str]]:
        """(first feature row, content digest) of every image, then every video."""
        items, row = [], 0
        for pv, grid in ((self.pixel_values, self.image_grid_thw), (self.pixel_values_videos, self.video_grid_thw)):
            if pv is None:
                continue
            start = 0
            for g in grid.tolist():
                patches = g[0] * g[1] * g[2]
                digest = hashlib.sha1(pv[start:start + patches].contiguous().numpy().tobytes()).hexdigest()
                items.append((row, f"{tuple(g)}:{digest}"))
                row += patches // (self.merge ** 2)
                start += patches
        return items

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """Positions of token indices [start, end): the prompt's own, then index + delta."""
        n = self.positions.shape[1]
        parts = []
        if start < n:
            parts.append(self.positions[:, start:min(end, n)])
        if end > n:
            gen = torch.arange(max(start, n), end) + self.delta
            parts.append(gen.unsqueeze(0).expand(3, -1))
        return torch.cat(parts, dim=1)


class MultimodalProcessor:
    def __init__(self, config: ModelConfig, folder: str | Path | None = None):
        if config.vision is None:
            raise ValueError("this model has no vision tower: images and videos are not accepted")
        v = config.vision
        geometry = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                        merge_size=v.spatial_merge_size)
        folder = Path(folder) if folder is not None else None
        if folder is not None and (folder / "preprocessor_config.json").exists():
            self.images = ImageProcessor.from_pretrained(folder)
        else:
            self.images = ImageProcessor(**geometry)
        if folder is not None and (folder / "video_preprocessor_config.json").exists():
            self.videos = VideoProcessor.from_pretrained(folder)
        else:
            self.videos = VideoProcessor(**geometry)
        self.config = config
        self.merge = v.spatial_merge_size

    def prepare(self, text: str, tokenizer: Any, images: list[Any] | None = None, videos: list[Any] | None = None,
                allow_remote: bool = False) -> tuple[str, list[int], MultimodalPrompt]:
        images, videos = list(images or []), list(videos or [])
        img = self.images(images, allow_remote=allow_remote) if images else None
        vid = self._videos(videos, allow_remote) if videos else None
        text = expand_image_tokens(text, img["image_grid_thw"] if img else [], self.merge)
        text = expand_video_tokens(text, vid["video_grid_thw"] if vid else [], vid["video_timestamps"] if vid else [],
                                   self.merge)
        ids = tokenizer.encode(text)
        mm = build_multimodal_prompt(ids, self.config, img and img["pixel_values"], img and img["image_grid_thw"],
                                     vid and vid["pixel_values_videos"], vid and vid["video_grid_thw"], self.merge)
        return text, ids, mm


    def _videos(self, videos: list[Any], allow_remote: bool) -> dict[str, Any]:
        """Each video is a file / URL / bytes, a list of frames (taken as already sampled at the processor's
        fps), or {"frames": [...], "fps": f} / {"video": ..., "fps": f} for frames at another rate."""
        parts = []
        for v in videos:
            fps = None
            if isinstance(v, dict):
                fps = v.get("fps")
                v = v.get("frames", v.get("video"))
            if isinstance(v, (list, tuple)) or (hasattr(v, "ndim") and getattr(v, "ndim", 0) == 4):
                parts.append(self.videos([v], frames_fps=float(fps or self.videos.fps), allow_remote=allow_remote))
            else:
                parts.append(self.videos([v], allow_remote=allow_remote))
        return {"pixel_values_videos": torch.cat([p["pixel_values_videos"] for p in parts]),
                "video_grid_thw": torch.cat([p["video_grid_thw"] for p in parts]),
                "video_timestamps": [t for p in parts for t in p["video_timestamps"]]}


def build_multimodal_prompt(ids: list[int], config: ModelConfig, pixel_values=None, image_grid_thw=None,
                            pixel_values_videos=None, video_grid_thw=None, merge: int = 2) -> MultimodalPrompt:
    positions, delta = mrope_positions(ids, image_grid_thw, video_grid_thw, image_token_id=config.image_token_id,
                                       video_token_id=config.video_token_id, merge_size=merge)
    t = torch.as_tensor(ids)
    index = torch.full((len(ids),), -1, dtype=torch.long)
    img = t == config.image_token_id
    vid = t == config.video_token_id
    n_img = int(img.sum())
    index[img] = torch.arange(n_img)
    index[vid] = n_img + torch.arange(int(vid.sum()))
    return MultimodalPrompt(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, positions, delta, index,
                            merge)


class VisionFeatureCache:
    """Vision features by content: the same image (or video) in several requests is encoded once.
    Keeps the `capacity` most recently used entries."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0

    def features(self, model: torch.nn.Module, pixel_values: torch.Tensor | None,
                 grid_thw: torch.Tensor | None) -> list[torch.Tensor]:
        if pixel_values is None:
            return []
        out, start = [], 0
        for g in grid_thw.tolist():
            rows = g[0] * g[1] * g[2]
            pv = pixel_values[start:start + rows]
            start += rows
            key = (tuple(g), hashlib.sha1(pv.contiguous().numpy().tobytes()).hexdigest())
            feats = self._entries.get(key)
            if feats is None:
                feats = model.encode_vision(pv, torch.tensor([g]))
                self._entries[key] = feats
                if len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            else:
                self.hits += 1
                self._entries.move_to_end(key)
            out.append(feats)
        return out

    def for_prompt(self, model: torch.nn.Module, mm: MultimodalPrompt) -> torch.Tensor:
        """All the prompt's features in feature_index order (images, then videos)."""
        parts = self.features(model, mm.pixel_values, mm.image_grid_thw)
        parts += self.features(model, mm.pixel_values_videos, mm.video_grid_thw)
        return torch.cat(parts) if parts else torch.zeros(0)
