"""Image preprocessing: parity with the reference processor, patch order, sources, errors, prompt expansion."""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35.multimodal import (
    ImageProcessor,
    MediaError,
    expand_image_tokens,
    load_image,
    num_image_tokens,
    smart_resize,
)

REFERENCE = Path("/work/shared/reference/Qwen3.5-397B-A17B-FP8")
MIN_PIXELS, MAX_PIXELS = 65536, 16777216


@pytest.fixture(scope="module")
def reference():
    """The transformers PIL-backend Qwen2-VL image processor configured like Qwen3.5 (no torchvision needed)."""
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    proc = mod.Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    return mod, proc


@pytest.fixture(scope="module")
def processor() -> ImageProcessor:
    return ImageProcessor()


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB picture: gradients, a pattern and noise (so resizing has real work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), ((x // 3 + y // 5) % 32) * 8]
    array = np.stack(planes, axis=-1) + rng.normal(0, 18, (height, width, 3))
    return np.clip(array, 0, 255).astype(np.uint8)


def run_reference(proc, image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = proc(image, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def assert_matches(ours: dict, ref_pixels: torch.Tensor, ref_grid: torch.Tensor) -> None:
    assert ours["image_grid_thw"].dtype == torch.long and ours["pixel_values"].dtype == torch.float32
    assert ours["image_grid_thw"].tolist() == ref_grid.tolist()
    assert ours["pixel_values"].shape == ref_pixels.shape
    # Same PIL bicubic on the same uint8 image and the same float arithmetic: in practice bit-identical; the 1e-2
    # bound is the contract.
    assert torch.allclose(ours["pixel_values"], ref_pixels, atol=1e-2, rtol=0)
    assert (ours["pixel_values"] - ref_pixels).abs().max().item() < 1e-6


def _modes() -> dict[str, Image.Image]:
    rgb = Image.fromarray(photo(37, 53))
    alpha = np.random.default_rng(3).integers(0, 256, (37, 53, 1), dtype=np.uint8)
    rgba = Image.fromarray(np.concatenate([photo(37, 53, 1), alpha], axis=-1), "RGBA")
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 5
    deep = Image.fromarray(photo(37, 53)[..., 0].astype(np.uint16) * 257).convert("I;16")
    return {
        "RGB": rgb, "RGBA": rgba, "L": rgb.convert("L"), "P": rgb.convert("P"), "P+transparency": palette_transparent,
        "LA": rgba.convert("LA"), "CMYK": rgb.convert("CMYK"), "1": rgb.convert("1"), "I;16": deep,
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_modes_match_reference(reference, processor, mode):
    image = _modes()[mode]
    assert_matches(processor(image), *run_reference(reference[1], image))


@pytest.mark.parametrize(
    "height,width,limits",
    [
        (5, 7, None),  # tiny: upscaled to the minimum pixel count
        (100, 3000, None),  # panorama, aspect 30
        (900, 301, None),  # portrait, odd sizes
        (333, 517, None),
        (4000, 5000, (MIN_PIXELS, 1 << 20)),  # huge, strongly downscaled (a lower cap keeps the test light)
        (2, 399, None),  # aspect ratio 199.5, just allowed
    ],
)
def test_sizes_match_reference(reference, processor, height, width, limits):
    if height * width > 1_000_000:
        # Building a 20-megapixel noise picture is slow here; a nearest-upscaled photo is just as real an input.
        image = Image.fromarray(photo(height // 10, width // 10, seed=height)).resize((width, height), Image.NEAREST)
    else:
        image = Image.fromarray(photo(height, width, seed=height))
    min_pixels, max_pixels = limits or (MIN_PIXELS, MAX_PIXELS)
    ours = processor(image, min_pixels=min_pixels, max_pixels=max_pixels)
    assert_matches(ours, *run_reference(reference[1], image, min_pixels, max_pixels))
    t, h, w = ours["image_grid_thw"][0].tolist()
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    assert ours["pixel_values"].shape == (h * w, 3 * 2 * 16 * 16)


def test_smart_resize_matches_reference_formula(reference):
    ref_resize = reference[0].smart_resize
    sizes = [(5, 7), (1, 1), (1, 150), (5000, 4000), (4000, 5000), (48, 48), (4096, 4096), (16, 3199), (17, 33),
             (1080, 1920), (720, 1280), (300, 20000), (257, 255), (80, 16000)]
    for height, width in sizes:
        for lo, hi in [(MIN_PIXELS, MAX_PIXELS), (256 * 28 * 28, 1280 * 28 * 28), (4096, 1 << 20)]:
            assert smart_resize(height, width, 32, lo, hi) == ref_resize(height, width, 32, lo, hi), (height, width)
    # The full-size 5000x4000 case, checked on grids only (its pixel values are ~400 MB).
    proc = ImageProcessor()
    assert proc.grid_thw(4000, 5000) == (1, 228, 286)
    assert reference[1].get_number_of_image_patches(4000, 5000, {}) == 228 * 286


@pytest.mark.parametrize("kind", ["hwc", "chw", "gray2d", "rgba", "float01", "tensor"])
def test_array_inputs(reference, processor, kind):
    rgb = photo(41, 29, seed=7)
    alpha = np.random.default_rng(5).integers(0, 256, (41, 29, 1), dtype=np.uint8)
    inputs = {
        "hwc": (rgb, rgb),
        "chw": (rgb.transpose(2, 0, 1).copy(), rgb.transpose(2, 0, 1).copy()),
        # The reference refuses 2-D arrays; the same picture as an L image is its equivalent.
        "gray2d": (rgb[..., 0], Image.fromarray(rgb[..., 0], "L")),
        "rgba": (np.concatenate([rgb, alpha], -1), np.concatenate([rgb, alpha], -1)),
        # Fractions in [0, 1] are scaled to levels (the reference double-rescales these; compare with the levels).
        "float01": (rgb.astype(np.float32) / 255, rgb),
        "tensor": (torch.from_numpy(rgb.copy()), rgb),
    }
    ours_input, ref_input = inputs[kind]
    assert_matches(processor(ours_input), *run_reference(reference[1], ref_input))


def test_patch_order_by_construction():
    """Row r of pixel_values is patch (block row, block col, row in block, col in block); values C, T, y, x."""
    proc = ImageProcessor(min_pixels=64 * 96, max_pixels=64 * 96)
    height, width = 64, 96  # already multiples of 32: no resampling, so values map back exactly
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([y * 3, x * 2, (y + x) % 256], axis=-1).astype(np.uint8)
    out = proc(rgb)
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    levels = np.round((out["pixel_values"].numpy() * 0.5 + 0.5) * 255).astype(np.int64)
    rows = levels.reshape(-1, 3, 2, 16, 16)
    assert np.array_equal(rows[:, :, 0], rows[:, :, 1])  # the still image is duplicated over the temporal pair
    gh, gw, m = 4, 6, 2
    r = 0
    for block_row in range(gh // m):
        for block_col in range(gw // m):
            for i in range(m):
                for j in range(m):
                    py, px = (block_row * m + i) * 16, (block_col * m + j) * 16
                    expected = rgb[py:py + 16, px:px + 16].transpose(2, 0, 1)
                    assert np.array_equal(rows[r, :, 0], expected), r
                    r += 1


def test_batch_concatenates_in_order(processor):
    a, b = Image.fromarray(photo(40, 60)), Image.fromarray(photo(90, 30, seed=2))
    both = processor([a, b])
    one, two = processor(a), processor(b)
    assert both["image_grid_thw"].tolist() == one["image_grid_thw"].tolist() + two["image_grid_thw"].tolist()
    assert torch.equal(both["pixel_values"], torch.cat([one["pixel_values"], two["pixel_values"]]))


def test_sources(tmp_path, processor):
    image = Image.fromarray(photo(30, 45))
    png = io.BytesIO()
    image.save(png, format="PNG")
    data = png.getvalue()
    path = tmp_path / "pic.png"
    path.write_bytes(data)
    expected = processor(image)["pixel_values"]
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in [str(path), path, data, url, path.as_uri(), base64.b64encode(data).decode()]:
        assert torch.equal(processor(source)["pixel_values"], expected), type(source)


def test_exif_orientation_applied_for_files():
    image = Image.fromarray(photo(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)  # width and height swapped, as the reference loader does


def test_remote_urls_need_permission(processor, tmp_path):
    with pytest.raises(MediaError, match="allow_remote"):
        processor("http://127.0.0.1:9/pic.png")
    image = Image.fromarray(photo(30, 45))
    image.save(tmp_path / "pic.png")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pic.png"
        out = processor(url, allow_remote=True)
        assert torch.equal(out["pixel_values"], processor(image)["pixel_values"])
        with pytest.raises(MediaError, match="could not download"):
            processor(url.replace("pic.png", "missing.png"), allow_remote=True)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "bad,match",
    [
        (b"", "empty"),
        (b"definitely not an image", "cannot decode"),
        ("/no/such/file.png", "not understood"),
        ("data:image/png;base64,AAAA", "cannot decode"),
        (Image.new("RGB", (0, 5)), "zero size"),
        (np.zeros((0, 4, 3), np.uint8), "zero size"),
        (np.zeros((5, 5, 2), np.uint8), "channel"),
        (np.zeros((2, 3, 4, 5), np.uint8), "dimensions"),
        (np.full((4, 4, 3), 300.0), "values"),
        (Image.new("RGB", (201, 1)), "aspect ratio"),
        (Image.new("RGB", (3000, 14)), "aspect ratio"),
        (12345, "unsupported"),
        ([], "no images"),
    ],
)
def test_bad_inputs_raise_value_error(processor, bad, match):
    with pytest.raises(ValueError, match=match):
        processor(bad)


def test_truncated_file_raises(processor):
    buf = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="cannot decode"):
        processor(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_token_counts_and_expansion(processor):
    grids = torch.tensor([[1, 14, 20], [1, 6, 188]])
    assert num_image_tokens(grids[0]) == 70 and processor.num_image_tokens([1, 6, 188]) == 282
    text = "a <|vision_start|><|image_pad|><|vision_end|> b <|vision_start|><|image_pad|><|vision_end|>"
    out = expand_image_tokens(text, grids)
    assert out == ("a <|vision_start|>" + "<|image_pad|>" * 70 + "<|vision_end|> b <|vision_start|>"
                   + "<|image_pad|>" * 282 + "<|vision_end|>")
    assert processor.expand_prompt(text, grids) == out
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 1"):
        expand_image_tokens(text, grids[:1])
    assert expand_image_tokens("no images", []) == "no images"
    # Consistency with the processor output: tokens = patches / merge^2.
    out = processor(Image.fromarray(photo(50, 70)))
    assert processor.num_image_tokens(out["image_grid_thw"][0]) * 4 == out["pixel_values"].shape[0]


def test_from_pretrained(tmp_path):
    proc = ImageProcessor.from_pretrained(REFERENCE)
    assert (proc.min_pixels, proc.max_pixels, proc.patch_size, proc.temporal_patch_size, proc.merge_size) == (
        MIN_PIXELS, MAX_PIXELS, 16, 2, 2)
    assert proc.image_mean == (0.5, 0.5, 0.5) and proc.image_std == (0.5, 0.5, 0.5)
    # Absent file: the Qwen3.5 defaults.
    empty = ImageProcessor.from_pretrained(tmp_path)
    assert (empty.min_pixels, empty.max_pixels, empty.patch_size) == (MIN_PIXELS, MAX_PIXELS, 16)
    # Legacy keys: top-level min_pixels / max_pixels override size; size may use min_pixels / max_pixels too.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 3136, "max_pixels": 1003520,
         "patch_size": 14, "image_mean": [0.48145466, 0.4578275, 0.40821073]}))
    legacy = ImageProcessor.from_pretrained(tmp_path)
    assert (legacy.min_pixels, legacy.max_pixels, legacy.patch_size) == (3136, 1003520, 14)
    assert legacy.image_mean[0] == pytest.approx(0.48145466)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"min_pixels": 100, "max_pixels": 200}}))
    assert ImageProcessor.from_pretrained(tmp_path).max_pixels == 200
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="directory"):
        ImageProcessor.from_pretrained(tmp_path / "missing")


def test_per_call_pixel_limits(processor):
    image = Image.fromarray(photo(600, 800))
    small = processor(image, min_pixels=4096, max_pixels=128 * 128)
    t, h, w = small["image_grid_thw"][0].tolist()
    assert h * w * 256 <= 128 * 128 and math.gcd(h, 2) == 2
    assert processor(image)["image_grid_thw"].tolist() == [[1, 38, 50]]
