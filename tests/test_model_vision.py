"""Images and video through the model: logits equal transformers' ConditionalGeneration (fp32)."""

from __future__ import annotations

import pytest
import torch

import qwen35
from conftest import TINY_TOKEN_IDS, TINY_VISION, assert_logits_close, make_hf_model, save_hf
from qwen35.multimodal.positions import mrope_positions

START, END = TINY_TOKEN_IDS["vision_start_token_id"], TINY_TOKEN_IDS["vision_end_token_id"]
IMG, VID = TINY_TOKEN_IDS["image_token_id"], TINY_TOKEN_IDS["video_token_id"]
PATCH_DIM = 3 * TINY_VISION["temporal_patch_size"] * TINY_VISION["patch_size"] ** 2


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    ref = make_hf_model("cg", moe=request.param == "moe")
    return ref, qwen35.load_model(save_hf(ref, tmp_path_factory.mktemp(request.param)))


def text(n, gen):
    return torch.randint(0, 118, (n,), generator=gen).tolist()


def image_tokens(grid):
    t, h, w = grid
    return [START] + [IMG] * (t * h * w // 4) + [END]


def video_tokens(grid, gen):
    t, h, w = grid
    out = []
    for _ in range(t):  # "<t seconds>" text, then one group per temporal patch
        out += text(3, gen) + [START] + [VID] * (h * w // 4) + [END]
    return out


def pixels(grid, gen):
    t, h, w = grid
    return torch.randn(t * h * w, PATCH_DIM, generator=gen)


def hf_forward(ref, ids, mask=None, **mm):
    tt = torch.zeros_like(ids)
    tt[ids == IMG] = 1
    tt[ids == VID] = 2
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask, mm_token_type_ids=tt, **mm).logits


def build(parts):
    return torch.tensor([sum(parts, [])])


@pytest.mark.parametrize("case", ["one_image", "two_images", "one_video", "mixed"])
def test_multimodal_logits_match_transformers(pair, case):
    ref, ours = pair
    gen = torch.Generator().manual_seed(len(case))
    mm = {}
    if case == "one_image":
        g = [(1, 4, 6)]
        ids = build([text(5, gen), image_tokens(g[0]), text(7, gen)])
        mm = dict(pixel_values=pixels(g[0], gen), image_grid_thw=torch.tensor(g))
    elif case == "two_images":
        g = [(1, 4, 6), (1, 8, 2)]
        ids = build([text(3, gen), image_tokens(g[0]), text(4, gen), image_tokens(g[1]), text(6, gen)])
        mm = dict(pixel_values=torch.cat([pixels(x, gen) for x in g]), image_grid_thw=torch.tensor(g))
    elif case == "one_video":
        v = (3, 4, 4)
        ids = build([text(4, gen), video_tokens(v, gen), text(5, gen)])
        mm = dict(pixel_values_videos=pixels(v, gen), video_grid_thw=torch.tensor([v]))
    else:
        g, v = (1, 6, 4), (2, 4, 6)
        ids = build([text(2, gen), video_tokens(v, gen), text(3, gen), image_tokens(g), text(9, gen)])
        mm = dict(pixel_values=pixels(g, gen), image_grid_thw=torch.tensor([g]),
                  pixel_values_videos=pixels(v, gen), video_grid_thw=torch.tensor([v]))
    assert_logits_close(ours(ids, **mm), hf_forward(ref, ids, **mm))


def test_padded_multimodal_batch_of_two(pair):
    ref, ours = pair
    gen = torch.Generator().manual_seed(3)
    g1, g2 = (1, 4, 6), (1, 4, 4)
    rows = [sum([text(5, gen), image_tokens(g1), text(3, gen)], []),
            sum([text(2, gen), image_tokens(g2), text(20, gen)], [])]
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, as generation uses
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    mm = dict(pixel_values=torch.cat([pixels(g1, gen), pixels(g2, gen)]), image_grid_thw=torch.tensor([g1, g2]))
    out = ours(ids, attention_mask=mask, **mm)
    expected = hf_forward(ref, ids, mask, **mm)
    keep = mask.bool()
    assert_logits_close(out[keep], expected[keep])


def test_placeholder_count_mismatch_is_a_clear_error(pair):
    _, ours = pair
    gen = torch.Generator().manual_seed(0)
    g = (1, 4, 6)
    ids = build([text(3, gen), [START] + [IMG] * 5 + [END]])
    with pytest.raises(ValueError, match="5 <|image_pad|> tokens but the images give 6 features"):
        ours(ids, pixel_values=pixels(g, gen), image_grid_thw=torch.tensor([g]))


def test_mrope_positions_follow_the_definition():
    ids = [1, 2, START] + [IMG] * 6 + [END, 3]
    pos, delta = mrope_positions(ids, torch.tensor([[1, 4, 6]]), image_token_id=IMG, video_token_id=VID)
    # text 0,1,2 ; image at s=3 on a 2x3 merged grid ; text resumes at 3 + max(2, 3) = 6
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[0, 3:9].tolist() == [3] * 6
    assert pos[1, 3:9].tolist() == [3, 3, 3, 4, 4, 4]
    assert pos[2, 3:9].tolist() == [3, 4, 5, 3, 4, 5]
    assert pos[:, 9:].tolist() == [[6, 7]] * 3
    assert delta == 8 - 11
