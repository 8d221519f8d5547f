"""Images and video through LLM.chat: greedy tokens equal transformers' generate on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import qwen35
from conftest import TINY_TEXT, make_weights_bite

REAL_IDS = dict(vision_start_token_id=248053, vision_end_token_id=248054, image_token_id=248056,
                video_token_id=248057)


def make_tiny_vl(path):
    """A tiny transformers Qwen3.5 with a vision tower and the real vocabulary, saved in `path`; returns it."""
    import transformers as tf

    torch.manual_seed(0)
    tc = dict(TINY_TEXT, vocab_size=248320, intermediate_size=40)
    vc = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=16, temporal_patch_size=2,
              spatial_merge_size=2, num_position_embeddings=16, out_hidden_size=32)
    ref = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=tc, vision_config=vc, **REAL_IDS)).eval()
    make_weights_bite(ref, seed=1)
    ref.save_pretrained(path)
    return ref


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vl")
    return make_tiny_vl(path), path


def picture(seed: int, size=(70, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def hf_greedy(ref, ids: list[int], n: int, **mm) -> list[int]:
    t = torch.tensor([ids])
    tt = torch.zeros_like(t)
    tt[t == REAL_IDS["image_token_id"]] = 1
    tt[t == REAL_IDS["video_token_id"]] = 2
    with torch.no_grad():
        out = ref.generate(input_ids=t, attention_mask=torch.ones_like(t), mm_token_type_ids=tt, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, **mm)
    return out[0, len(ids):].tolist()


def test_chat_with_image_equals_transformers_generate(tiny_vl):
    ref, path = tiny_vl
    llm = qwen35.LLM(str(path), dtype="float32")
    img = picture(0)
    messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    params = qwen35.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    out = llm.chat(messages, params, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert ids.count(REAL_IDS["image_token_id"]) > 1  # placeholder expanded to the image's tokens
    proc = llm.engine.prompts.mm_processor.images([img])
    expected = hf_greedy(ref, ids, 6, pixel_values=proc["pixel_values"], image_grid_thw=proc["image_grid_thw"])
    assert list(out.outputs[0].token_ids) == expected


def test_two_images_image_url_and_chunked_prefill(tiny_vl, tmp_path):
    """Two images (one as an image_url file path), prefilled in chunks that end inside an image."""
    ref, path = tiny_vl
    llm = qwen35.LLM(str(path), dtype="float32", max_num_batched_tokens=24)
    a, b = picture(1), picture(2, size=(40, 90))
    b.save(tmp_path / "b.png")
    messages = [{"role": "user", "content": [
        {"type": "image", "image": a}, {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": str(tmp_path / "b.png")}}, {"type": "text", "text": "compare"}]}]
    params = qwen35.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    out = llm.chat(messages, params, use_tqdm=False)[0]
    proc = llm.engine.prompts.mm_processor.images([a, Image.open(tmp_path / "b.png")])
    expected = hf_greedy(ref, out.prompt_token_ids, 5, pixel_values=proc["pixel_values"],
                         image_grid_thw=proc["image_grid_thw"])
    assert list(out.outputs[0].token_ids) == expected


def test_video_frames_and_batch_with_shared_image(tiny_vl):
    ref, path = tiny_vl
    llm = qwen35.LLM(str(path), dtype="float32")
    frames = [picture(10 + i, size=(64, 48)) for i in range(4)]
    video_msgs = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "?"}]}]
    img = picture(5)
    image_msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "hi"}]}]
    params = qwen35.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    hits_before = llm.engine.runner.vision_cache.hits
    outs = llm.chat([video_msgs, image_msgs, image_msgs], params, use_tqdm=False)
    assert llm.engine.runner.vision_cache.hits >= hits_before + 1  # the repeated image was encoded once
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    # the video request alone, against transformers (frames given with the processor's default 2 fps)
    mm = llm.engine.prompts.mm_processor
    vid = mm.videos([frames], frames_fps=2.0)
    expected = hf_greedy(ref, outs[0].prompt_token_ids, 4, pixel_values_videos=vid["pixel_values_videos"],
                         video_grid_thw=vid["video_grid_thw"])
    assert list(outs[0].outputs[0].token_ids) == expected


def test_bad_multimodal_input_is_a_clear_error(tiny_vl):
    _, path = tiny_vl
    llm = qwen35.LLM(str(path), dtype="float32")
    with pytest.raises(ValueError, match="placeholders but 2 images"):
        llm.generate({"prompt": "<|vision_start|><|image_pad|><|vision_end|> x",
                      "multi_modal_data": {"image": [picture(0), picture(1)]}}, use_tqdm=False)
    with pytest.raises(ValueError):
        llm.chat([{"role": "user", "content": [{"type": "image", "image": b"not an image"}]}], use_tqdm=False)
    # the engine keeps serving
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, qwen35.SamplingParams(max_tokens=2, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_prefix_cache_keys_images_by_content(tiny_vl):
    """A long shared text prefix, then an image: the same image again hits past it (same tokens as
    transformers); another image of the same size does not hit beyond the text before it."""
    ref, path = tiny_vl
    llm = qwen35.LLM(str(path), dtype="float32")
    system = {"role": "system", "content": "Look closely at every picture and describe it. " * 12}
    params = qwen35.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def ask(img):
        msgs = [system, {"role": "user", "content": [{"type": "image", "image": img},
                                                     {"type": "text", "text": "What is in the picture? " * 8}]}]
        return llm.chat(msgs, params, use_tqdm=False)[0]

    a, b = picture(21, size=(64, 64)), picture(22, size=(64, 64))
    first, same, other = ask(a), ask(a), ask(b)
    start = first.prompt_token_ids.index(REAL_IDS["image_token_id"])  # where the picture begins
    assert first.num_cached_tokens == 0 and same.num_cached_tokens > start
    assert other.num_cached_tokens <= start and other.prompt_token_ids == first.prompt_token_ids
    for out, img in ((same, a), (other, b)):
        proc = llm.engine.prompts.mm_processor.images([img])
        expected = hf_greedy(ref, out.prompt_token_ids, 4, pixel_values=proc["pixel_values"],
                             image_grid_thw=proc["image_grid_thw"])
        assert list(out.outputs[0].token_ids) == expected
