"""Checkpoint loading: safetensors (sharded, mmap, fused or per-expert), dummy init, hub resolution."""

from qwen35.weights.loader import load_model, load_weights
from qwen35.weights.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "load_model", "load_weights"]
