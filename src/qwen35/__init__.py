"""qwen35: an engine for the Qwen3.5 model family."""

from qwen35.config import ConfigError, ModelConfig
from qwen35.weights import CheckpointError, load_model

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "load_model", "__version__"]
