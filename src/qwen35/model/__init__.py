"""The Qwen3.5 model: layers that read like the equations in FACTS.md."""

from qwen35.model.cache import CacheLayout, ForwardBatch, HybridCache, text_positions
from qwen35.model.qwen35 import Qwen35Model

__all__ = ["CacheLayout", "ForwardBatch", "HybridCache", "Qwen35Model", "text_positions"]
