"""Video preprocessing: real mp4 / webm / mov files made with PyAV, checked against the reference definition.

transformers' Qwen3VLVideoProcessor cannot be instantiated without torchvision (not installable here), so the
reference is assembled from its own pieces that run without it: ``read_video_pyav`` (decoding + sampling),
``Qwen3VLVideoProcessor.sample_frames`` / ``patchify``, the module's ``smart_resize`` and
``Qwen3VLProcessor._calculate_timestamps``. The two torchvision calls are written out: ``tvF.resize`` on a uint8
CPU tensor with bicubic + antialias runs ``torch.nn.functional.interpolate`` natively on uint8, and the fused
rescale+normalise is ``(x - 255 * mean) / (255 * std)`` in float32.
"""

from __future__ import annotations

import base64
import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35.multimodal import (
    MediaError,
    VideoProcessor,
    decode_video,
    expand_video_tokens,
    frame_timestamps,
    sample_frame_indices,
    smart_resize_video,
)

av = pytest.importorskip("av")

REFERENCE = Path("/work/shared/reference/Qwen3.5-397B-A17B-FP8")
MIN_PIXELS, MAX_PIXELS = 4096, 25165824
WIDTH, HEIGHT, RATE, COUNT = 64, 48, 10, 30  # 3 s at 10 fps


@pytest.fixture(scope="module")
def ref():
    vmod = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    pmod = pytest.importorskip("transformers.models.qwen3_vl.processing_qwen3_vl")
    vutils = pytest.importorskip("transformers.video_utils")
    # sample_frames only reads these attributes of the processor.
    defaults = SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    return SimpleNamespace(
        smart_resize=vmod.smart_resize,
        sample=partial(vmod.Qwen3VLVideoProcessor.sample_frames, defaults),
        patchify=vmod.Qwen3VLVideoProcessor.patchify,
        timestamps=pmod.Qwen3VLProcessor._calculate_timestamps,
        metadata=vutils.VideoMetadata,
        read_pyav=vutils.read_video_pyav,
    )


def source_frame(i: int) -> np.ndarray:
    """Frame i of the test clip: a colour that changes every frame and a white square moving right."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[..., 0] = (i * 37) % 256
    frame[..., 1] = (i * 91 + 40) % 256
    frame[..., 2] = 200 - (i * 5) % 200
    x = (i * 2) % (WIDTH - 16)
    frame[16:32, x:x + 16] = 255
    return frame


CODECS = {"mp4": "libx264", "webm": "libvpx", "mov": "mpeg4"}


def write_clip(path: Path, codec: str, count: int = COUNT) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(source_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    paths = {}
    for ext, codec in CODECS.items():
        paths[ext] = folder / f"clip.{ext}"
        write_clip(paths[ext], codec)
    paths["odd"] = folder / "odd.mp4"
    write_clip(paths["odd"], "libx264", count=25)  # samples 5 frames: an odd count
    return paths


def decode_all(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def reference_pipeline(ref, frames: np.ndarray, indices, video_fps: float):
    """The reference's processing of already-sampled uint8 frames (T, H, W, 3)."""
    video = torch.from_numpy(frames).contiguous().permute(0, 3, 1, 2).contiguous()
    t, _, height, width = video.shape
    h, w = ref.smart_resize(num_frames=t, height=height, width=width, temporal_factor=2, factor=32,
                            min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    resized = torch.nn.functional.interpolate(video, size=(h, w), mode="bicubic", align_corners=False,
                                              antialias=True)
    mean = torch.tensor([0.5] * 3) * 255.0
    std = torch.tensor([0.5] * 3) * 255.0
    normed = (resized.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    patches, gt, gh, gw = ref.patchify(None, normed[None], patch_size=16, merge_size=2, temporal_patch_size=2)
    stamps = ref.timestamps(None, list(indices), video_fps, 2)
    return patches[0], [gt, gh, gw], stamps


def assert_same(ours: dict, pixels: torch.Tensor, grid: list[int], stamps: list[float], indices) -> None:
    assert ours["video_grid_thw"].dtype == torch.long and ours["pixel_values_videos"].dtype == torch.float32
    assert ours["video_grid_thw"].tolist() == [grid]
    assert ours["video_frame_indices"] == [list(map(int, indices))]
    assert ours["video_timestamps"] == [pytest.approx(stamps, abs=1e-12)]
    assert ours["pixel_values_videos"].shape == pixels.shape
    assert (ours["pixel_values_videos"] - pixels).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def processor() -> VideoProcessor:
    return VideoProcessor.from_pretrained(REFERENCE)


def test_mp4_matches_reference_decoder(ref, clips, processor):
    """The whole reference path for a file: read_video_pyav + sample_frames, then processing."""
    frames, metadata = ref.read_pyav(str(clips["mp4"]), sample_indices_fn=ref.sample)
    assert metadata.total_num_frames == COUNT and metadata.fps == RATE
    expected = reference_pipeline(ref, frames, metadata.frames_indices, metadata.fps)
    ours = processor(str(clips["mp4"]))
    assert_same(ours, *expected, metadata.frames_indices)
    assert ours["video_frame_indices"] == [[0, 6, 12, 17, 23, 29]]
    assert ours["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert ours["video_fps"] == [10.0]


@pytest.mark.parametrize("ext", ["mp4", "webm", "mov", "odd"])
def test_files_match_reference_on_decoded_frames(ref, clips, processor, ext):
    """Every container (webm stores no frame count) against the reference's array path on all decoded frames."""
    frames, video_fps = decode_all(clips[ext])
    metadata = ref.metadata(total_num_frames=len(frames), fps=video_fps)
    indices = ref.sample(metadata=metadata)
    expected = reference_pipeline(ref, frames[indices], indices, video_fps)
    ours = processor(clips[ext])
    assert_same(ours, *expected, indices)
    if ext == "odd":
        assert len(indices) == 5 and ours["video_grid_thw"][0, 0].item() == 3
        assert ours["video_timestamps"][0][-1] == indices[-1] / RATE  # last pair = last frame twice


@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_decoded_frames_are_the_encoded_ones(clips, ext):
    frames, indices, video_fps, total = decode_video(clips[ext], lambda n, fps: np.arange(n))
    assert (total, video_fps, len(frames)) == (COUNT, RATE, COUNT)
    sources = np.stack([source_frame(i) for i in range(COUNT)]).astype(np.int64)
    for i, frame in enumerate(frames):
        errors = np.abs(sources - frame.astype(np.int64)).mean(axis=(1, 2, 3))
        assert errors.argmin() == i and errors[i] < 12, (i, errors[i])


def test_frame_lists_equal_the_file(clips, processor):
    frames, video_fps = decode_all(clips["mp4"])
    from_file = processor(clips["mp4"])
    pil_frames = [Image.fromarray(f) for f in frames]
    for video in (pil_frames, frames, torch.from_numpy(frames), list(frames)):
        ours = processor(video, frames_fps=video_fps)
        for key in ("video_grid_thw", "pixel_values_videos"):
            assert torch.equal(ours[key], from_file[key]), (type(video), key)
        assert ours["video_timestamps"] == from_file["video_timestamps"]
        assert ours["video_frame_indices"] == from_file["video_frame_indices"]
    # A batch mixing a file and frames: outputs concatenated in order.
    both = processor([str(clips["mp4"]), pil_frames], frames_fps=[None, video_fps])
    assert both["video_grid_thw"].tolist() == from_file["video_grid_thw"].tolist() * 2
    assert torch.equal(both["pixel_values_videos"], torch.cat([from_file["pixel_values_videos"]] * 2))


def test_sources_bytes_and_data_url(clips, processor):
    data = clips["webm"].read_bytes()
    expected = processor(clips["webm"])["pixel_values_videos"]
    url = "data:video/webm;base64," + base64.b64encode(data).decode()
    for source in (data, url, clips["webm"].as_uri()):
        assert torch.equal(processor(source)["pixel_values_videos"], expected)
    with open(clips["webm"], "rb") as handle:  # an open binary file works too
        assert torch.equal(processor(handle)["pixel_values_videos"], expected)
    with pytest.raises(MediaError, match="allow_remote"):
        processor("https://127.0.0.1:9/clip.mp4")


def test_presampled_frames_and_single_frame(processor):
    frames = [source_frame(i) for i in range(6)]
    out = processor(frames, frames_fps=2.0, do_sample_frames=False)
    assert out["video_frame_indices"] == [[0, 1, 2, 3, 4, 5]]
    assert out["video_timestamps"] == [[0.25, 1.25, 2.25]]
    # One frame is padded to a pair (the reference refuses it).
    one = processor([source_frame(0)], frames_fps=1.0)
    assert one["video_grid_thw"][0, 0].item() == 1 and one["video_timestamps"] == [[0.0]]


def test_sampling_rule_matches_reference(ref):
    for total in (1, 2, 3, 4, 5, 7, 30, 31, 100, 1001, 5000, 20000):
        for video_fps in (None, 1.0, 10.0, 24.0, 29.97, 60.0):
            for fps in (2, 0.5, 3):
                metadata = ref.metadata(total_num_frames=total, fps=video_fps)
                expected = ref.sample(metadata=metadata, fps=fps)
                ours = sample_frame_indices(total, video_fps, fps=fps)
                assert ours.tolist() == expected.tolist(), (total, video_fps, fps)
        expected = ref.sample(metadata=ref.metadata(total_num_frames=total, fps=30.0), num_frames=4, fps=None)
        assert sample_frame_indices(total, 30.0, num_frames=4).tolist() == expected.tolist()
    assert len(sample_frame_indices(20000, 1.0)) == 768  # max_frames
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 30.0)


def test_smart_resize_matches_reference(ref):
    for frames in (2, 3, 4, 5, 16, 768):
        for height, width in ((48, 64), (5, 7), (20, 300), (1080, 1920), (1920, 1080), (31, 33), (4000, 6000)):
            expected = ref.smart_resize(frames, height, width, temporal_factor=2, factor=32, min_pixels=MIN_PIXELS,
                                        max_pixels=MAX_PIXELS)
            assert smart_resize_video(frames, height, width) == expected, (frames, height, width)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize_video(4, 32, 6500)


def test_pixel_budget_and_cap():
    proc = VideoProcessor()
    # Budget over the whole clip: 768 full-HD frames share 25165824 pixels (about 32768 each).
    h, w = proc.target_size(768, 1080, 1920)
    assert 768 * h * w <= MAX_PIXELS and (h, w) == (128, 224)
    # Few frames: the uncapped reference default keeps near-native resolution.
    assert proc.target_size(4, 1080, 1920) == (1088, 1920)
    # With the per-frame cap (the reference's opt-in qwen-vl-utils behaviour): at most 768 merged tokens a frame.
    capped = VideoProcessor(cap_pixels_per_frame=True)
    h, w = capped.target_size(4, 1080, 1920)
    per_frame = max(min(768 * 32 * 32, MAX_PIXELS // 4), int(MIN_PIXELS * 1.05))
    assert (h, w) == smart_resize_video(4, 1080, 1920, max_pixels=per_frame * 4)
    assert h * w // (32 * 32) <= 768


def test_timestamps_and_expansion():
    assert frame_timestamps([0, 6, 12, 17, 23, 29], 10.0) == pytest.approx([0.3, 1.45, 2.6])
    assert frame_timestamps([0, 5, 10], 10.0) == pytest.approx([0.25, 1.0])  # odd: last index repeated
    grid = torch.tensor([[2, 4, 6]])
    text = "see <|vision_start|><|video_pad|><|vision_end|> now"
    group = "<|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>"
    expected = "see <0.3 seconds>" + group + "<1.4 seconds>" + group + " now"  # 1.45 formats as 1.4, as reference
    assert expand_video_tokens(text, grid, [[0.3, 1.45]]) == expected
    # A bare <|video_pad|> (no start/end around it) is expanded the same way.
    assert expand_video_tokens("see <|video_pad|> now", grid, [[0.3, 1.45]]) == expected
    two = expand_video_tokens(text + text, torch.tensor([[1, 2, 2], [1, 2, 4]]), [[0.0], [5.0]])
    assert two == ("see <0.0 seconds><|vision_start|><|video_pad|><|vision_end|> now"
                   "see <5.0 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|> now")
    with pytest.raises(ValueError, match="1 video placeholders but 2"):
        expand_video_tokens(text, torch.tensor([[1, 2, 2], [1, 2, 2]]), [[0.0], [0.0]])
    with pytest.raises(ValueError, match="timestamps"):
        expand_video_tokens(text, grid, [[0.0]])


def test_expand_prompt_from_outputs(clips, processor):
    out = processor(clips["mp4"])
    text = processor.expand_prompt("<|vision_start|><|video_pad|><|vision_end|>", out)
    assert text.count("<|video_pad|>") == processor.num_video_tokens(out["video_grid_thw"][0]) == 3 * 4 * 4 // 4
    assert text.startswith("<0.3 seconds><|vision_start|>") and text.count("seconds>") == 3


@pytest.mark.parametrize(
    "video,kwargs,match",
    [
        (b"not a video at all", {}, "decode|video stream"),
        ("/no/such/clip.mp4", {}, "not understood"),
        ([source_frame(0)] * 4, {}, "frames_fps"),
        ([source_frame(0), np.zeros((10, 10, 3), np.uint8)], {"frames_fps": 1.0, "do_sample_frames": False},
         "differ in size"),
        ([], {}, "no videos"),
        (np.zeros((3, 4, 5), np.uint8), {"frames_fps": 1.0}, "4-D"),
    ],
)
def test_bad_videos_raise_value_error(processor, video, kwargs, match):
    with pytest.raises(ValueError, match=match):
        processor(video, **kwargs)


def test_from_pretrained(tmp_path):
    proc = VideoProcessor.from_pretrained(REFERENCE)
    assert (proc.min_pixels, proc.max_pixels, proc.patch_size, proc.temporal_patch_size, proc.merge_size) == (
        MIN_PIXELS, MAX_PIXELS, 16, 2, 2)
    assert (proc.fps, proc.min_frames, proc.max_frames, proc.cap_pixels_per_frame) == (2.0, 4, 768, False)
    assert VideoProcessor.from_pretrained(tmp_path).max_pixels == MAX_PIXELS  # absent file: defaults
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 100, "longest_edge": 1000000}, "fps": 1, "max_frames": 64,
         "cap_pixels_per_frame": True}))
    custom = VideoProcessor.from_pretrained(tmp_path)
    assert (custom.min_pixels, custom.max_pixels, custom.fps, custom.max_frames, custom.cap_pixels_per_frame) == (
        100, 1000000, 1.0, 64, True)
