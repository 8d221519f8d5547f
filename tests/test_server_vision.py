"""Images over HTTP: data: URLs, local files under --allowed-local-media-path, refusals; the server's answer equals
the offline LLM.chat on the same image (a tiny dummy model with a vision tower and the real vocabulary)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import openai
import pytest
import test_engine_support  # noqa: F401  (one torch thread)
from PIL import Image
from test_engine_support import TINY
from test_server_support import ServerThread, call

import qwen35
from qwen35.server import MediaPolicy, ServerConfig

VISION = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=16, temporal_patch_size=2,
              spatial_merge_size=2, num_position_embeddings=16, out_hidden_size=32)
IDS = dict(vision_start_token_id=248053, vision_end_token_id=248054, image_token_id=248056, video_token_id=248057)


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vl")
    cfg = {"model_type": "qwen3_5", "text_config": dict(TINY, vocab_size=248320), "vision_config": VISION, **IDS}
    (folder / "config.json").write_text(json.dumps(cfg))
    return qwen35.load_model(folder, load_format="dummy")


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (50, 70, 3), dtype=np.uint8))


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_images_over_http(vl_model, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    picture(1).save(media / "one.png")
    llm = qwen35.LLM(vl_model, kv_cache_memory_bytes=1 << 25, max_model_len=1024)
    config = ServerConfig(served_model_name="vl", media=MediaPolicy(local_root=media))
    with ServerThread(llm, config) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)

        def ask(url: str, **kw):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
            return client.chat.completions.create(model="vl", messages=[{"role": "user", "content": content}],
                                                  max_tokens=5, temperature=0, **kw)

        r = ask(data_url(picture(0)))
        text_only = client.chat.completions.create(
            model="vl", messages=[{"role": "user", "content": "What is it?"}], max_tokens=5, temperature=0)
        # 70x50 -> smart_resize to 64x64 at least 65536 pixels... the image adds its pad tokens to the prompt
        assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 10
        # the same as the offline API on the same picture
        offline = qwen35.LLM(vl_model, kv_cache_memory_bytes=1 << 25, max_model_len=1024)
        ref = offline.chat([{"role": "user", "content": [{"type": "image", "image": picture(0)},
                                                         {"type": "text", "text": "What is it?"}]}],
                           qwen35.SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.choices[0].message.reasoning_content == ref.outputs[0].text.strip()
        # streamed: the same
        streamed = "".join((getattr(c.choices[0].delta, "reasoning_content", None) or "")
                           for c in ask(data_url(picture(0)), stream=True) if c.choices)
        assert streamed == r.choices[0].message.reasoning_content
        # a local file inside the allowed folder works; outside, http(s) and broken data are refused
        assert ask(f"file://{media}/one.png").usage.prompt_tokens == r.usage.prompt_tokens
        (tmp_path / "secret.png").write_bytes((media / "one.png").read_bytes())
        for url, code in ((f"file://{tmp_path}/secret.png", "media_not_allowed"),
                          (f"file://{media}/../secret.png", "media_not_allowed"),
                          ("http://127.0.0.1:1/x.png", "media_not_allowed"),
                          ("data:image/png;base64,AAAA", "invalid_image")):
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
            reply = call(srv.port, "POST", "/v1/chat/completions", body)
            assert reply.status == 400 and reply.error["code"] == code, (url, reply.body)
        assert call(srv.port, "GET", "/health").status == 200


def mp4_bytes(path, frames: int = 8, fps: int = 4) -> bytes:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            arr = np.full((48, 64, 3), (i * 30) % 255, dtype=np.uint8)
            arr[:, : 8 * i] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


def test_video_over_http_equals_offline(vl_model, tmp_path):
    clip = mp4_bytes(tmp_path / "clip.mp4")
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    llm = qwen35.LLM(vl_model, kv_cache_memory_bytes=1 << 25, max_model_len=2048)
    with ServerThread(llm, ServerConfig(served_model_name="vl")) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]
        r = client.chat.completions.create(model="vl", messages=[{"role": "user", "content": content}],
                                           max_tokens=4, temperature=0)
        offline = qwen35.LLM(vl_model, kv_cache_memory_bytes=1 << 25, max_model_len=2048)
        ref = offline.chat([{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "clip.mp4")},
                                                         {"type": "text", "text": "What happens?"}]}],
                           qwen35.SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.choices[0].message.reasoning_content == ref.outputs[0].text.strip()
        body = {"messages": [{"role": "user", "content": [{"type": "video_url",
                                                           "video_url": {"url": "http://127.0.0.1:1/v.mp4"}}]}]}
        reply = call(srv.port, "POST", "/v1/chat/completions", body)
        assert reply.status == 400 and reply.error["code"] == "media_not_allowed"
