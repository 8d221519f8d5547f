"""qwen35: an engine for the Qwen3.5 model family.

Public names: `load_model`, `ModelConfig`, `LLM`, `SamplingParams`, `StructuredOutputsParams`, `load_tokenizer`
(the last four are imported on first use, so `import qwen35` stays light).
"""

from __future__ import annotations

import importlib
from typing import Any

from qwen35.config import ConfigError, ModelConfig
from qwen35.weights import CheckpointError, load_model

__version__ = "0.1.0"

_LAZY = {
    "LLM": "qwen35.engine.llm",
    "SamplingParams": "qwen35.engine.sampling",
    "StructuredOutputsParams": "qwen35.engine.sampling",
    "RequestOutput": "qwen35.engine.outputs",
    "CompletionOutput": "qwen35.engine.outputs",
    "load_tokenizer": "qwen35.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen35' has no attribute {name!r}")


__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "load_model", "__version__", *_LAZY]
