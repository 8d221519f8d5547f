"""Image and video preprocessing for the Qwen3.5 vision encoder, and the prompt expansion that goes with it.

``ImageProcessor`` / ``VideoProcessor`` read ``preprocessor_config.json`` / ``video_preprocessor_config.json`` and
produce the encoder inputs; ``expand_image_tokens`` / ``expand_video_tokens`` turn the chat template's
placeholders into the right number of pad tokens. ``load_image`` reads images from paths, bytes and URLs.
"""

from qwen35.multimodal.image import (
    IMAGE_PAD,
    ImageProcessor,
    expand_image_tokens,
    num_image_tokens,
    smart_resize,
    to_rgb_array,
)
from qwen35.multimodal.media import MediaError, fetch_bytes, load_image, open_video_source
from qwen35.multimodal.video import (
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    VideoProcessor,
    decode_video,
    expand_video_tokens,
    frame_timestamps,
    sample_frame_indices,
    smart_resize_video,
)

__all__ = [
    "IMAGE_PAD",
    "VIDEO_PAD",
    "VISION_END",
    "VISION_START",
    "ImageProcessor",
    "MediaError",
    "VideoProcessor",
    "decode_video",
    "expand_image_tokens",
    "expand_video_tokens",
    "fetch_bytes",
    "frame_timestamps",
    "load_image",
    "num_image_tokens",
    "open_video_source",
    "sample_frame_indices",
    "smart_resize",
    "smart_resize_video",
    "to_rgb_array",
]
